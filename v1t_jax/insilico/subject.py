"""The subject of in-silico experiments: a population's responses as a function of images.

Everything in v1t_jax.insilico works on a `Subject`: responses [B, N] as a function of
model-input images [B, h, w, c] (the standardised, resized images the core sees), with
behaviour and pupil centre held fixed. `Subject.from_predictor` makes one from a trained run;
any JAX function of images (a planted Gabor model in the tests) or a NumPy one (the simulator's
ground truth; forward-only experiments) works too. Image coordinates: x = column, y = row (row 0
at the top), pixel centres at integers; orientations are directions of a grating's wave
vector, in [0, pi).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Subject:
  """Responses of N neurons to model-input images, behaviour fixed.

  respond: image [B, h, w, c] -> responses [B, N]; traceable by JAX when `differentiable`.
  pixel_min / pixel_max: model-input values of raw grey levels 0 and 255 (per channel, [c]).
  Model input 0 is the dataset's mean grey level ("grey").
  select: optional neurons -> a `respond` of only those neurons that computes nothing else
  (`restricted`; a trained model's readout then runs for those neurons only).
  """
  respond: Callable
  image_hwc: tuple[int, int, int]
  num_neurons: int
  pixel_min: np.ndarray
  pixel_max: np.ndarray
  differentiable: bool = True
  name: str = "model"
  select: Callable | None = None

  def restricted(self, neurons) -> Subject:
    """The same subject with only `neurons` (responses [B, len(neurons)], in that order)."""
    index = tuple(int(n) for n in neurons)
    if self.select is not None:
      respond = self.select(index)
    else:
      columns, full = np.asarray(index), self.respond
      respond = lambda x: full(x)[:, columns]  # noqa: E731
    return dataclasses.replace(self, respond=respond, num_neurons=len(index), select=None)

  @classmethod
  def from_predictor(cls, predictor, mouse: str, behavior=None, pupil_center=None) -> Subject:
    """The trained model of `mouse`; behavior [3] / pupil_center [2] raw (default: the means)."""
    record = predictor.mouse(mouse)
    as_row = lambda v: None if v is None else np.asarray(v, np.float32).reshape(1, -1)  # noqa: E731
    b_1x3, p_1x2 = predictor.normalise_behavior(mouse, 1, as_row(behavior), as_row(pupil_center))

    def responder(neurons=None):
      fn = predictor.response_fn(mouse, neurons)

      def respond(image_BxHxWxC):
        n = image_BxHxWxC.shape[0]
        return fn(image_BxHxWxC, jnp.broadcast_to(b_1x3, (n, 3)),
                  jnp.broadcast_to(p_1x2, (n, 2)))
      return respond

    c = predictor.image_hwc[2]
    lo = (0.0 - record.image_mean) / record.image_std
    hi = (255.0 - record.image_mean) / record.image_std
    if lo.size != c:   # gray_scale: one model channel made from several raw ones
      lo, hi = np.full(c, lo.mean()), np.full(c, hi.mean())
    return cls(responder(), tuple(predictor.image_hwc), record.neurons, lo.astype(np.float32),
               hi.astype(np.float32), True, f"{record.name} (step {predictor.step})",
               select=responder)

  @functools.cached_property
  def jitted(self) -> Callable:
    """`respond` compiled (JAX subjects)."""
    return jax.jit(self.respond)


def evaluate(subject: Subject, images_NxHxWxC: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Responses [N_images, N] in batches (one compiled batch size for JAX subjects)."""
  x = np.asarray(images_NxHxWxC, np.float32)
  fn = subject.jitted if subject.differentiable else subject.respond
  out = []
  for start in range(0, len(x), batch_size):
    chunk = x[start:start + batch_size]
    pad = batch_size - len(chunk) if subject.differentiable else 0
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
    out.append(np.asarray(fn(chunk), np.float32)[: len(chunk) - pad])
  return np.concatenate(out) if out else np.zeros((0, subject.num_neurons), np.float32)


def check_neurons(subject: Subject, neurons) -> np.ndarray:
  idx = np.arange(subject.num_neurons) if neurons is None else np.asarray(neurons, np.int64)
  if idx.ndim != 1 or idx.size == 0:
    raise ValueError(f"neurons must be a non-empty list of indices, got {neurons!r}")
  bad = idx[(idx < 0) | (idx >= subject.num_neurons)]
  if bad.size:
    raise ValueError(f"neuron indices {bad[:5].tolist()} out of range: {subject.name} has "
                     f"{subject.num_neurons} neurons (0-{subject.num_neurons - 1})")
  return idx


class Progress:
  """One line per `every` seconds on stderr: done/total, rate and ETA."""

  def __init__(self, what: str, total: int, enabled: bool, every: float = 5.0):
    self.what, self.total, self.enabled, self.every = what, total, enabled, every
    self.start = self.last = time.time()

  def __call__(self, done: int):
    now = time.time()
    if not self.enabled or (now - self.last < self.every and done < self.total):
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / max(rate, 1e-9)
    print(f"{self.what}: {done}/{self.total} ({rate:.1f}/s, ETA {eta:.0f} s)", file=sys.stderr,
          flush=True)



def blur_matrix(n: int, sigma: float) -> np.ndarray:
  """[n, n] Gaussian blur along one axis, rows normalised (so edges keep their mean)."""
  if sigma <= 0:
    return np.eye(n, dtype=np.float32)
  d = np.arange(n)[:, None] - np.arange(n)[None, :]
  k = np.exp(-0.5 * (d / sigma) ** 2)
  return (k / k.sum(1, keepdims=True)).astype(np.float32)

