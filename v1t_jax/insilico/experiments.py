"""In-silico experiments on a model of a neuron population: MEIs, receptive fields, tuning.

Everything works on a `Subject`: responses [B, N] as a function of model-input images
[B, h, w, c] (the standardised, resized images the core sees), with behaviour and pupil centre
held fixed. `Subject.from_predictor` makes one from a trained run; any JAX function of images
(a planted Gabor model in the tests) or a NumPy one (the simulator's ground truth; forward-only
experiments) works too. Image coordinates: x = column, y = row (row 0 at the top), pixel centres
at integers; orientations are directions of a grating's wave vector, in [0, pi).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Subject:
  """Responses of N neurons to model-input images, behaviour fixed.

  respond: image [B, h, w, c] -> responses [B, N]; traceable by JAX when `differentiable`.
  pixel_min / pixel_max: model-input values of raw grey levels 0 and 255 (per channel, [c]).
  Model input 0 is the dataset's mean grey level ("grey").
  """
  respond: Callable
  image_hwc: tuple[int, int, int]
  num_neurons: int
  pixel_min: np.ndarray
  pixel_max: np.ndarray
  differentiable: bool = True
  name: str = "model"

  @classmethod
  def from_predictor(cls, predictor, mouse: str, behavior=None, pupil_center=None) -> Subject:
    """The trained model of `mouse`; behavior [3] / pupil_center [2] raw (default: the means)."""
    record = predictor.mouse(mouse)
    as_row = lambda v: None if v is None else np.asarray(v, np.float32).reshape(1, -1)  # noqa: E731
    b_1x3, p_1x2 = predictor.normalise_behavior(mouse, 1, as_row(behavior), as_row(pupil_center))
    fn = predictor.response_fn(mouse)

    def respond(image_BxHxWxC):
      n = image_BxHxWxC.shape[0]
      return fn(image_BxHxWxC, jnp.broadcast_to(b_1x3, (n, 3)), jnp.broadcast_to(p_1x2, (n, 2)))

    c = predictor.image_hwc[2]
    lo = (0.0 - record.image_mean) / record.image_std
    hi = (255.0 - record.image_mean) / record.image_std
    if lo.size != c:   # gray_scale: one model channel made from several raw ones
      lo, hi = np.full(c, lo.mean()), np.full(c, hi.mean())
    return cls(respond, tuple(predictor.image_hwc), record.neurons, lo.astype(np.float32),
               hi.astype(np.float32), True, f"{record.name} (step {predictor.step})")


def evaluate(subject: Subject, images_NxHxWxC: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Responses [N_images, N] in batches (one compiled batch size for JAX subjects)."""
  x = np.asarray(images_NxHxWxC, np.float32)
  fn = _jitted(subject) if subject.differentiable else subject.respond
  out = []
  for start in range(0, len(x), batch_size):
    chunk = x[start:start + batch_size]
    pad = batch_size - len(chunk) if subject.differentiable else 0
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
    out.append(np.asarray(fn(chunk), np.float32)[: len(chunk) - pad])
  return np.concatenate(out) if out else np.zeros((0, subject.num_neurons), np.float32)


_JIT_CACHE: dict[int, Callable] = {}


def _jitted(subject: Subject) -> Callable:
  key = id(subject.respond)
  if key not in _JIT_CACHE:
    _JIT_CACHE[key] = jax.jit(subject.respond)
  return _JIT_CACHE[key]


def _check_neurons(subject: Subject, neurons) -> np.ndarray:
  idx = np.arange(subject.num_neurons) if neurons is None else np.asarray(neurons, np.int64)
  if idx.ndim != 1 or idx.size == 0:
    raise ValueError(f"neurons must be a non-empty list of indices, got {neurons!r}")
  bad = idx[(idx < 0) | (idx >= subject.num_neurons)]
  if bad.size:
    raise ValueError(f"neuron indices {bad[:5].tolist()} out of range: {subject.name} has "
                     f"{subject.num_neurons} neurons (0-{subject.num_neurons - 1})")
  return idx


class _Progress:
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


# ---------------------------------------------------------------------------------------------
# Image-space tools.


def blur_matrix(n: int, sigma: float) -> np.ndarray:
  """[n, n] Gaussian blur along one axis, rows normalised (so edges keep their mean)."""
  if sigma <= 0:
    return np.eye(n, dtype=np.float32)
  d = np.arange(n)[:, None] - np.arange(n)[None, :]
  k = np.exp(-0.5 * (d / sigma) ** 2)
  return (k / k.sum(1, keepdims=True)).astype(np.float32)


def _blur(x_BxHxWxC, blur_y_HxH, blur_x_WxW):
  return jnp.einsum("yh,bhwc,xw->byxc", blur_y_HxH, x_BxHxWxC, blur_x_WxW)


def fourier_scale(h: int, w: int, decay: float) -> np.ndarray:
  """[h, w // 2 + 1] amplitude scale 1 / f^decay of an rfft2 parametrisation (Olah et al. 2017),
  the lowest frequency 1 / max(h, w) standing in for f = 0; unit mean square."""
  f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
  s = 1.0 / np.maximum(f, 1.0 / max(h, w)) ** decay
  return (s / np.sqrt((s**2).mean())).astype(np.float32)


def _roll_each(x_BxHxWxC, shifts_Bx2):
  return jax.vmap(lambda im, s: jnp.roll(im, (s[0], s[1]), axis=(0, 1)))(x_BxHxWxC, shifts_Bx2)


# ---------------------------------------------------------------------------------------------
# Most exciting inputs.


def meis(subject: Subject, neurons: Sequence[int], *, seeds: Sequence[int] = (0, 1, 2, 3),
         steps: int = 100, lr: float = 0.05, optimizer: str = "adam", norm: float | None = 10.0,
         clip: bool = True, precondition: str = "blur", blur_sigma: float = 1.0,
         fourier_decay: float = 1.0, jitter: int = 1, init_std: float = 0.1,
         progress: bool = False) -> dict:
  """Most exciting inputs by gradient ascent on the image (sinzlab/mei's `gradient_ascent`).

  All (neuron, seed) pairs are optimised at once: one batch, one jitted step. Each step the
  image is decoded from its parameters (`precondition="fourier"`: a 1/f^decay-scaled spectrum;
  otherwise the pixels), scaled to L2 norm `norm` (fixed contrast, model-input units; None =
  free) and clipped to the pixel range of raw grey levels 0-255 (`clip`); it is shifted by a
  random offset of up to `jitter` pixels per axis, and the neuron's response is maximised with
  optax (`optimizer` "adam" or "sgd", learning rate `lr`). `precondition="blur"` smooths the
  gradient with a Gaussian of `blur_sigma` pixels. The initial image depends only on the seed,
  so a neuron's MEI does not depend on the other neurons in the batch.

  Returns images [n, S, h, w, c] (model inputs; `images_raw` in grey levels is added by
  callers that know the mouse's statistics), activations [n, S] (final image, no jitter),
  trace [steps, n, S] (activation at each step), neurons [n], seeds [S], norms [n, S].
  """
  if not subject.differentiable:
    raise ValueError(f"MEIs need gradients: {subject.name} is not a JAX function")
  if precondition not in ("blur", "fourier", "none"):
    raise ValueError(f"precondition must be 'blur', 'fourier' or 'none', got {precondition!r}")
  if optimizer not in ("adam", "sgd"):
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  neurons = _check_neurons(subject, neurons)
  seeds = [int(s) for s in seeds]
  h, w, c = subject.image_hwc
  n, s = len(neurons), len(seeds)
  target_P = jnp.asarray(np.repeat(neurons, s))
  seed_P = np.tile(np.asarray(seeds), n)
  lo, hi = jnp.asarray(subject.pixel_min), jnp.asarray(subject.pixel_max)

  init_by_seed = {sd: np.asarray(jax.random.normal(jax.random.key(sd), (h, w, c))) * init_std
                  for sd in seeds}
  x0_PxHxWxC = np.stack([init_by_seed[sd] for sd in seed_P.tolist()])
  if precondition == "fourier":
    scale = jnp.asarray(fourier_scale(h, w, fourier_decay))[None, :, :, None]
    # Orthonormal transform: spectrum coefficients on the pixels' scale, so one lr suits both.
    spec = np.fft.rfft2(x0_PxHxWxC, axes=(1, 2), norm="ortho") / np.asarray(scale)
    param = jnp.asarray(np.stack([spec.real, spec.imag]).astype(np.float32))

    def decode(p):
      return jnp.fft.irfft2((p[0] + 1j * p[1]) * scale, s=(h, w), axes=(1, 2), norm="ortho")
  else:
    param = jnp.asarray(x0_PxHxWxC)
    decode = lambda p: p  # noqa: E731

  def constrain(x_PxHxWxC):
    if norm is not None:
      length = jnp.sqrt(jnp.sum(x_PxHxWxC**2, axis=(1, 2, 3), keepdims=True))
      x_PxHxWxC = x_PxHxWxC * (norm / jnp.maximum(length, 1e-8))
    return jnp.clip(x_PxHxWxC, lo, hi) if clip else x_PxHxWxC

  def activation(x_PxHxWxC):
    r_PxN = subject.respond(x_PxHxWxC)
    return jnp.take_along_axis(r_PxN, target_P[:, None], axis=1)[:, 0]

  blur_y, blur_x = jnp.asarray(blur_matrix(h, blur_sigma)), jnp.asarray(blur_matrix(w, blur_sigma))
  tx = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr)
  keys_P = jax.vmap(jax.random.key)(jnp.asarray(seed_P))

  def objective(p, step):
    x = constrain(decode(p))
    if jitter:
      shifts = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, step), (2,), -jitter,
                                                     jitter + 1))(keys_P)
      x = _roll_each(x, shifts)
    act_P = activation(x)
    return -jnp.sum(act_P), act_P

  @jax.jit
  def update(p, opt_state, step):
    (_, act_P), g = jax.value_and_grad(objective, has_aux=True)(p, step)
    if precondition == "blur":
      g = _blur(g, blur_y, blur_x)
    updates, opt_state = tx.update(g, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, act_P

  opt_state = tx.init(param)
  trace = np.zeros((steps, n * s), np.float32)
  report = _Progress("MEI steps", steps, progress)
  for step in range(steps):
    param, opt_state, act = update(param, opt_state, jnp.int32(step))
    trace[step] = np.asarray(act)
    report(step + 1)
  final = jax.jit(lambda p: (constrain(decode(p)),))(param)[0]
  act = np.asarray(jax.jit(activation)(final))
  images = np.asarray(final).reshape(n, s, h, w, c)
  return {"images": images, "activations": act.reshape(n, s),
          "trace": trace.reshape(steps, n, s), "neurons": neurons, "seeds": np.asarray(seeds),
          "norms": np.sqrt((images**2).sum(axis=(2, 3, 4)))}


# ---------------------------------------------------------------------------------------------
# Receptive fields.


def white_noise(rng: np.random.Generator, shape) -> np.ndarray:
  """Uniform white noise standardised to mean 0, variance 1 (V1T's misc/estimate_aRFs.py draws
  U(0, 1) and standardises it)."""
  return ((rng.random(shape, dtype=np.float32) - 0.5) * np.float32(math.sqrt(12.0)))


def receptive_fields(subject: Subject, neurons: Sequence[int] | None = None, *,
                     n_noise: int = 20000, batch_size: int = 500, seed: int = 0,
                     noise_scale: float = 1.0, gradient: bool = True, fit: bool = True,
                     progress: bool = False) -> dict:
  """Artificial receptive fields ([n, h, w, c] maps) with 2D Gaussian fits.

  - "sta": white-noise spike-triggered average, the V1T paper's aRF: the response-weighted mean
    of `n_noise` uniform white-noise images (unit variance times `noise_scale`). We subtract the
    mean response first (the original sums raw responses: the same map plus a noise term);
  - "sta2": the second-order map, the response-weighted mean of (noise^2 - E noise^2): it
    localises cells whose STA vanishes (complex cells respond to energy, not sign);
  - "combined": sqrt(z_sta^2 + z_sta2^2), each in units of its background noise: the map whose
    fit gives the RF centre of simple and complex cells alike (`rf_centers`);
  - "grad": the gradient of the response at the grey image (JAX subjects, `gradient=True`).

  fits[map] is [n, 8]: amplitude, x0, y0, sigma_x, sigma_y, theta, offset, R^2 (see
  `fit_gaussian_2d`); `center[map]` [n, 2] = (x0, y0).
  """
  neurons = _check_neurons(subject, neurons)
  h, w, c = subject.image_hwc
  rng = np.random.default_rng(seed)
  sum_rx = np.zeros((len(neurons), h * w * c), np.float64)
  sum_rx2 = np.zeros_like(sum_rx)
  sum_x = np.zeros(h * w * c, np.float64)
  sum_x2 = np.zeros(h * w * c, np.float64)
  sum_r = np.zeros(len(neurons), np.float64)
  report = _Progress("white noise", n_noise, progress)
  done = 0
  while done < n_noise:
    b = min(batch_size, n_noise - done)
    x = white_noise(rng, (b, h, w, c)) * np.float32(noise_scale)
    r = evaluate(subject, x, batch_size)[:, neurons]
    flat = x.reshape(b, -1)
    sum_rx += r.T @ flat
    sum_rx2 += r.T @ (flat * flat)
    sum_x += flat.sum(0)
    sum_x2 += (flat * flat).sum(0)
    sum_r += r.sum(0)
    done += b
    report(done)
  mean_r = sum_r / n_noise
  sta = (sum_rx - mean_r[:, None] * sum_x[None]) / n_noise
  sta2 = (sum_rx2 - mean_r[:, None] * sum_x2[None]) / n_noise
  maps = {"sta": sta.reshape(-1, h, w, c).astype(np.float32),
          "sta2": sta2.reshape(-1, h, w, c).astype(np.float32)}
  maps["combined"] = combined_map(maps["sta"], maps["sta2"])
  if gradient and subject.differentiable:
    maps["grad"] = gradient_at(subject, np.zeros((h, w, c), np.float32), neurons, batch_size)
  result = {"maps": maps, "neurons": neurons, "n_noise": n_noise}
  if fit:
    result["fits"] = {k: fit_gaussian_2d(v) for k, v in maps.items()}
    result["center"] = {k: f[:, 1:3] for k, f in result["fits"].items()}
  return result


def robust_z(maps_NxHxWxC: np.ndarray) -> np.ndarray:
  """Each map in units of its background noise (median and 1.4826 MAD over pixels)."""
  m = np.asarray(maps_NxHxWxC, np.float64)
  med = np.median(m, axis=(1, 2, 3), keepdims=True)
  mad = 1.4826 * np.median(np.abs(m - med), axis=(1, 2, 3), keepdims=True)
  return (m - med) / np.maximum(mad, 1e-30)


def combined_map(sta: np.ndarray, sta2: np.ndarray) -> np.ndarray:
  """sqrt(z_sta^2 + z_sta2^2) with robust z-scores: one map that localises simple cells (by
  their STA) and complex cells (by their second-order map) without choosing between them."""
  return np.sqrt(robust_z(sta) ** 2 + robust_z(sta2) ** 2).astype(np.float32)


def rf_centers(rf: dict) -> np.ndarray:
  """RF centres [n, 2] (x, y) of `receptive_fields`' result: the Gaussian fit of the "combined"
  map, which localises simple cells by their STA and complex cells by their second-order map."""
  return rf["fits"]["combined"][:, 1:3]


def gradient_at(subject: Subject, image_HxWxC: np.ndarray, neurons: Sequence[int],
                batch_size: int = 256) -> np.ndarray:
  """d response_n / d image at one image, for each neuron: [n, h, w, c]."""
  neurons = _check_neurons(subject, neurons)

  @jax.jit
  def grads(x_BxHxWxC, target_B):
    def total(x):
      r = subject.respond(x)
      return jnp.sum(jnp.take_along_axis(r, target_B[:, None], axis=1))
    return jax.grad(total)(x_BxHxWxC)

  out = []
  for start in range(0, len(neurons), batch_size):
    idx = neurons[start:start + batch_size]
    pad = batch_size - len(idx) if len(neurons) > batch_size else 0
    target = np.concatenate([idx, np.zeros(pad, np.int64)])
    x = np.broadcast_to(image_HxWxC, (len(target), *image_HxWxC.shape))
    out.append(np.asarray(grads(jnp.asarray(x), jnp.asarray(target)))[: len(idx)])
  return np.concatenate(out)


def gaussian_2d(xy, amplitude, x0, y0, sigma_x, sigma_y, theta, offset):
  """Rotated 2D Gaussian (V1T's misc/estimate_aRFs.py parametrisation), flattened."""
  x, y = xy
  ct, st = np.cos(theta), np.sin(theta)
  a = ct**2 / (2 * sigma_x**2) + st**2 / (2 * sigma_y**2)
  b = -np.sin(2 * theta) / (4 * sigma_x**2) + np.sin(2 * theta) / (4 * sigma_y**2)
  cc = st**2 / (2 * sigma_x**2) + ct**2 / (2 * sigma_y**2)
  dx, dy = x - x0, y - y0
  return (offset + amplitude * np.exp(-(a * dx**2 + 2 * b * dx * dy + cc * dy**2))).ravel()


def _gaussian_jnp(p, x, y):
  """gaussian_2d with p = (amplitude, x0, y0, log sigma_x, log sigma_y, theta, offset)."""
  amplitude, x0, y0, log_sx, log_sy, theta, offset = p
  ct, st = jnp.cos(theta), jnp.sin(theta)
  dx, dy = x - x0, y - y0
  u, v = ct * dx - st * dy, st * dx + ct * dy      # the ellipse's axes (gaussian_2d's theta)
  return offset + amplitude * jnp.exp(-0.5 * ((u / jnp.exp(log_sx)) ** 2
                                              + (v / jnp.exp(log_sy)) ** 2))


@jax.jit
def _levenberg_marquardt(p0_Nx7, data_NxP, x_P, y_P):
  """Least-squares Gaussian fits, all maps at once (vmapped Levenberg-Marquardt, 100 steps)."""
  def fit(p0, data):
    def residual(p):
      return _gaussian_jnp(p, x_P, y_P) - data

    def step(_, state):
      p, lam, cost = state
      r, jac = residual(p), jax.jacfwd(residual)(p)
      jtj = jac.T @ jac
      delta = jnp.linalg.solve(jtj + lam * (jnp.diag(jnp.diag(jtj)) + 1e-9 * jnp.eye(7)),
                               -jac.T @ r)
      new = p + delta
      new_cost = jnp.sum(residual(new) ** 2)
      better = new_cost < cost
      return (jnp.where(better, new, p), jnp.where(better, lam / 3, lam * 3),
              jnp.where(better, new_cost, cost))

    p, _, cost = jax.lax.fori_loop(0, 100, step, (p0, 1e-2, jnp.sum(residual(p0) ** 2)))
    return p, cost
  return jax.vmap(fit)(p0_Nx7, data_NxP)


def fit_gaussian_2d(maps_NxHxWxC: np.ndarray) -> np.ndarray:
  """Fit `gaussian_2d` to each map's |standardised| values (channels averaged), as V1T's
  aRF fit; returns [n, 8] = 7 parameters + R^2 (NaN where the fit failed).

  All maps are fitted at once by a vmapped Levenberg-Marquardt in JAX (the original: scipy's
  curve_fit one neuron at a time). Also where we differ: maps are centred on their median (the
  background), not their mean, so |.| of a one-signed blob stays a Gaussian; fits start at the
  peak of the smoothed map with sigma 3 (the original: the image centre, sigma 10); no noise is
  added to the data; a centre outside the image or a sigma outside 0.3-max(h, w) is a failed
  fit. Reported with sigma_x >= sigma_y, theta in [0, pi).
  """
  maps = np.asarray(maps_NxHxWxC, np.float64)
  n, h, w, _ = maps.shape
  # A flat map (e.g. the gradient of a complex cell at grey) has no receptive field to fit.
  flat = maps.std(axis=(1, 2, 3)) <= 1e-6 * (np.abs(maps).max(axis=(1, 2, 3)) + 1e-30)
  z = (maps - np.median(maps, axis=(1, 2, 3), keepdims=True)) / (
      maps.std(axis=(1, 2, 3), keepdims=True) + 1e-12)
  z = np.abs(z).mean(axis=-1)
  smooth = np.einsum("yh,nhw,xw->nyx", blur_matrix(h, 1.5), z, blur_matrix(w, 1.5))
  y0, x0 = np.unravel_index(smooth.reshape(n, -1).argmax(axis=1), (h, w))
  data = z.reshape(n, -1)
  background = np.median(data, axis=1)
  p0 = np.stack([np.maximum(data.max(axis=1) - background, 1e-3), x0, y0,
                 np.full(n, np.log(3.0)), np.full(n, np.log(3.0)), np.zeros(n), background], 1)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  p, cost = _levenberg_marquardt(jnp.asarray(p0, jnp.float32), jnp.asarray(data, jnp.float32),
                                 jnp.asarray(xx.ravel()), jnp.asarray(yy.ravel()))
  p, cost = np.asarray(p, np.float64), np.asarray(cost, np.float64)
  with np.errstate(over="ignore"):   # a diverged fit: inf sigma, rejected below
    sx, sy = np.exp(p[:, 3]), np.exp(p[:, 4])
  swap = sy > sx   # the same ellipse with the axes swapped
  theta = np.mod(p[:, 5] + swap * np.pi / 2, np.pi)
  sx, sy = np.maximum(sx, sy), np.minimum(sx, sy)
  r2 = 1.0 - cost / np.maximum(((data - data.mean(1, keepdims=True)) ** 2).sum(1), 1e-12)
  ok = (~flat & np.all(np.isfinite(p), axis=1) & (p[:, 0] > 0) & (p[:, 1] >= -0.5)
        & (p[:, 1] <= w - 0.5) & (p[:, 2] >= -0.5) & (p[:, 2] <= h - 0.5) & (sy >= 0.3)
        & (sx <= max(h, w)))
  out = np.stack([p[:, 0], p[:, 1], p[:, 2], sx, sy, theta, p[:, 6], r2], axis=1)
  out[~ok] = np.nan
  return out


# ---------------------------------------------------------------------------------------------
# Gratings.


def gratings(image_hw: tuple[int, int], orientations: np.ndarray, spatial_frequencies: np.ndarray,
             phases: np.ndarray, contrast: float, center=None,
             aperture_sigma: float | None = None) -> np.ndarray:
  """Sinusoidal gratings [O, F, P, h, w]: contrast * cos(2 pi f (x cos o + y sin o) + phase),
  x, y relative to `center` ((x, y), default the image centre); with `aperture_sigma` the
  grating fades into grey under a Gaussian window of that sd (pixels) around `center`."""
  h, w = image_hw
  cx, cy = ((w - 1) / 2, (h - 1) / 2) if center is None else (float(center[0]), float(center[1]))
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  dx, dy = xx - cx, yy - cy
  o = np.asarray(orientations, np.float64)[:, None, None, None, None]
  f = np.asarray(spatial_frequencies, np.float64)[None, :, None, None, None]
  p = np.asarray(phases, np.float64)[None, None, :, None, None]
  g = contrast * np.cos(2 * np.pi * f * (dx * np.cos(o) + dy * np.sin(o)) + p)
  if aperture_sigma:
    g = g * np.exp(-(dx**2 + dy**2) / (2 * aperture_sigma**2))
  return g.astype(np.float32)


def default_spatial_frequencies(n: int = 8) -> np.ndarray:
  """Log-spaced 0.025-0.3 cycles per model pixel (periods 3.3-40 px)."""
  return np.geomspace(0.025, 0.3, n)


def grating_tuning(subject: Subject, neurons: Sequence[int] | None = None, *,
                   orientations: int = 16, spatial_frequencies: Sequence[float] | None = None,
                   phases: int = 8, contrast: float = 1.0, centers: np.ndarray | None = None,
                   aperture_sigma: float = 6.0, batch_size: int = 256,
                   progress: bool = False) -> dict:
  """Responses to gratings over orientation x spatial frequency x phase, and their summary.

  Full field (centers=None): one set of images for all neurons. RF-centred (centers [n, 2] in
  (x, y) model pixels, e.g. the fitted RF centres): each neuron sees gratings in a Gaussian
  aperture of `aperture_sigma` pixels around its centre. Contrast is the amplitude in model-input
  units (clipped to the pixel range).

  Per neuron: `responses` [n, O, F, P], `grey` [n] (response to the grey image),
  `preferred_orientation` (rad, [0, pi): the vector average of the phase-peak response at the
  preferred SF), `preferred_sf` (cycles/pixel, the peak over the grid refined by a parabola in
  log f), `osi` ((R_pref - R_orth) / (R_pref + R_orth), responses above grey), `f1_f0` (first
  harmonic over phase / mean above grey at the preferred grating; > 1: simple, Skottun et al.
  1991) and `is_simple`.
  """
  neurons = _check_neurons(subject, neurons)
  if orientations < 2 or orientations % 2 or phases < 3:
    raise ValueError(f"need an even number of orientations >= 2 and >= 3 phases, got "
                     f"{orientations} and {phases}")
  h, w, c = subject.image_hwc
  ori = np.arange(orientations) * np.pi / orientations
  sf = np.asarray(default_spatial_frequencies() if spatial_frequencies is None
                  else spatial_frequencies, np.float64)
  ph = np.arange(phases) * 2 * np.pi / phases
  o_, f_, p_ = len(ori), len(sf), len(ph)

  def images(center=None, sigma=None):
    g = gratings((h, w), ori, sf, ph, contrast, center, sigma).reshape(-1, h, w, 1)
    g = np.broadcast_to(g, (*g.shape[:3], c))
    return np.clip(g, subject.pixel_min, subject.pixel_max).astype(np.float32)

  grey = evaluate(subject, np.zeros((1, h, w, c), np.float32), 1)[0, neurons]
  if centers is None:
    responses = evaluate(subject, images(), batch_size)[:, neurons].T
  else:
    centers = np.asarray(centers, np.float64)
    if centers.shape != (len(neurons), 2):
      raise ValueError(f"centers must be [n, 2] = [{len(neurons)}, 2], got {list(centers.shape)}")
    responses = np.empty((len(neurons), o_ * f_ * p_), np.float32)
    report = _Progress("RF-centred gratings", len(neurons), progress)
    for i, (neuron, centre) in enumerate(zip(neurons, centers)):
      responses[i] = evaluate(subject, images(centre, aperture_sigma), batch_size)[:, neuron]
      report(i + 1)
  responses = responses.reshape(len(neurons), o_, f_, p_)
  return {"responses": responses, "grey": grey, "orientations": ori, "spatial_frequencies": sf,
          "phases": ph, "neurons": neurons, **tuning_summary(responses, grey, ori, sf, ph)}


def tuning_summary(responses_NxOxFxP: np.ndarray, grey_N: np.ndarray, ori: np.ndarray,
                   sf: np.ndarray, ph: np.ndarray) -> dict:
  """Preferred orientation and SF, OSI and F1/F0 of `grating_tuning`'s responses."""
  r = np.asarray(responses_NxOxFxP, np.float64)
  n, o_, f_, p_ = r.shape
  above = r - np.asarray(grey_N, np.float64)[:, None, None, None]
  peak = above.max(axis=3)                                   # [n, O, F], phase-peak response
  f0 = above.mean(axis=3)
  f1 = 2.0 * np.abs((r * np.exp(-1j * np.asarray(ph))).sum(axis=3)) / p_
  best = peak.reshape(n, -1).argmax(axis=1)
  o_i, f_i = np.unravel_index(best, (o_, f_))
  rows = np.arange(n)
  # SF: parabola through log f at the peak and its neighbours.
  logf = np.log(sf)
  curve = peak[rows, o_i]                                    # [n, F] at the preferred orientation
  pref_sf = np.exp(logf[f_i])
  inner = (f_i > 0) & (f_i < f_ - 1)
  if inner.any():
    i = f_i[inner]
    ym, y0, yp = curve[inner, i - 1], curve[inner, i], curve[inner, i + 1]
    denom = ym - 2 * y0 + yp
    step = np.where(np.abs(denom) > 1e-12, 0.5 * (ym - yp) / np.where(denom == 0, 1, denom), 0)
    spacing = (logf[-1] - logf[0]) / (f_ - 1)
    pref_sf[inner] = np.exp(logf[i] + np.clip(step, -0.5, 0.5) * spacing)
  # Orientation: vector average of the (baseline-free) tuning curve at the preferred SF.
  tune = peak[rows, :, f_i]                                  # [n, O]
  tune = np.maximum(tune - tune.min(axis=1, keepdims=True), 0.0)
  vec = (tune * np.exp(2j * ori)[None]).sum(axis=1)
  pref_ori = np.mod(np.angle(vec) / 2, np.pi)
  pos = np.maximum(peak[rows, :, f_i], 0.0)
  r_pref, r_orth = pos[rows, o_i], pos[rows, (o_i + o_ // 2) % o_]
  osi = (r_pref - r_orth) / np.maximum(r_pref + r_orth, 1e-12)
  f0_best, f1_best = f0[rows, o_i, f_i], f1[rows, o_i, f_i]
  ratio = np.where(f0_best > 1e-12, f1_best / np.maximum(f0_best, 1e-12), np.inf)
  return {"preferred_orientation": pref_ori, "preferred_sf": pref_sf, "osi": osi,
          "f0": f0_best, "f1": f1_best, "f1_f0": ratio, "is_simple": f1_best > f0_best,
          "circular_variance": 1.0 - np.abs(vec) / np.maximum(tune.sum(axis=1), 1e-12)}
