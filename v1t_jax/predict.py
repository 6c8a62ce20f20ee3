r"""Predictions for your own images from a checkpoint alone (no dataset, no TensorFlow).

  python -m v1t_jax.predict --workdir runs/v1t --mouse S1 --images stimuli.npy --out pred.npy
  python -m v1t_jax.predict --workdir runs/v1t --mouse 27204-5-13 --images pngs/ \
      --behavior behavior.npy --pupil_center pupil.npy --out pred.npy

`--images` is a `.npy` stack [n, C, H, W] of raw pixels (0-255 grey levels, as the dataset's
`data/images/<i>.npy`) or a folder of PNG files (read in natural name order, e.g. 2 before 10;
single-channel mice only). Any size works: each image goes through the mouse's own preprocessing,
i.e. z-scoring with the stored image statistics, then the original's center crop + bilinear resize
to the model's input (144x256 -> 36x64 is the exact 2x2 block mean). `--behavior` [n, 3] and
`--pupil_center` [n, 2] are raw values; left out, every trial gets the mouse's dataset means.

Writes `pred.npy` [n, neurons] in standardised response units (raw response x the per-neuron
precision, the units of training and of the challenge's ground truth), `pred.neuron_ids.npy`
(the mouse's unit ids, the column order) and, for PNG input, `pred.images.txt` (the row order).

In Python, `Predictor.from_workdir(workdir).predict(mouse, images)` does the same; predictions
equal those of the training-time evaluation for the same trials.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from v1t_jax import checkpoints, cli, image_stage, readout
from v1t_jax.model import ModelConfig, abstract_model

CHECKPOINT_DIRS = {"best": "best", "latest": "checkpoints"}   # checkpoints.checkpoint_managers' layout


# ---------------------------------------------------------------------------------------------
# What a checkpoint records of each mouse.


@dataclasses.dataclass(frozen=True)
class MouseRecord:
  """One mouse of `meta["run"]["mice"]`: enough to preprocess its inputs and name its neurons."""
  index: int                       # position on the model's mouse axis
  name: str                        # V1T id (S0, A, ...) or the data key
  data_key: str
  neurons: int
  unit_ids: np.ndarray             # [neurons] int64, the column order of every prediction
  image_chw: tuple[int, int, int]  # raw image shape of the dataset
  has_behavior: bool
  has_pupil_center: bool
  image_mean: np.ndarray           # [1] or [C]
  image_std: np.ndarray
  behavior_scale: np.ndarray       # [3]
  pupil_mean: np.ndarray           # [2]
  pupil_scale: np.ndarray          # [2]
  behavior_mean: np.ndarray        # [3] raw, the default input
  pupil_center_mean: np.ndarray    # [2] raw, the default input

  @classmethod
  def from_run(cls, index: int, record: dict) -> MouseRecord:
    norm = record["normalisation"]
    f32 = lambda x: np.asarray(x, np.float32)   # noqa: E731
    return cls(index=index, name=record["name"], data_key=record["data_key"],
               neurons=int(record["neurons"]),
               unit_ids=np.asarray(record["unit_ids"], np.int64),
               image_chw=tuple(int(v) for v in record["image_shape"]),
               has_behavior=bool(record["has_behavior"]),
               has_pupil_center=bool(record["has_pupil_center"]),
               image_mean=f32(norm["image_mean"]), image_std=f32(norm["image_std"]),
               behavior_scale=f32(norm["behavior_scale"]), pupil_mean=f32(norm["pupil_mean"]),
               pupil_scale=f32(norm["pupil_scale"]), behavior_mean=f32(record["behavior_mean"]),
               pupil_center_mean=f32(record["pupil_center_mean"]))


def checkpoint_dir(workdir: str, which: str) -> str:
  if which not in CHECKPOINT_DIRS:
    raise ValueError(f"which must be one of {sorted(CHECKPOINT_DIRS)}, got {which!r}")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir}: no such run directory")
  path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIRS[which])
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{workdir}: no checkpoints (expected {path}/<step>/ written by "
                            "launch_train.py)")
  return path


def _open(path: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
  """A manager that creates nothing (only `save` would write) and the step to restore."""
  manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
  steps = manager.all_steps()
  if not steps:
    manager.close()
    raise FileNotFoundError(f"{path}: no complete checkpoint step")
  if step is None:
    return manager, max(steps)
  if step not in steps:
    manager.close()
    raise FileNotFoundError(f"{path}: no checkpoint of step {step} (saved steps: {sorted(steps)})")
  return manager, step


# ---------------------------------------------------------------------------------------------
# Preprocessing (the input pipeline's MouseReader.decode, in NumPy).


def image_stage_matrices(in_hw: tuple[int, int], data_cfg, out_hw: tuple[int, int]):
  """The pipeline's crop + resize for images of any size, ending at the model's (h, w).

  The pipeline crops by `center_crop`, then resizes to `image_size` unless the crop already has
  that size; `axis_matrix` keeps a crop alone when it has the target size, so asking always for
  the model's input size gives the pipeline's matrices for the dataset's own image size.
  """
  return image_stage.crop_resize_matrices(in_hw, float(data_cfg.center_crop), tuple(out_hw))


def preprocess_images(images_NxCxHxW: np.ndarray, mouse: MouseRecord, data_cfg,
                      image_hwc: Sequence[int]) -> np.ndarray:
  """Raw pixels [n, C, H, W] -> the model's input [n, h, w, c] (float32)."""
  x = np.asarray(images_NxCxHxW, np.float32)
  x = (x - mouse.image_mean.reshape(-1, 1, 1)) / mouse.image_std.reshape(-1, 1, 1)
  a_y, a_x = image_stage_matrices(x.shape[-2:], data_cfg, tuple(image_hwc[:2]))
  # Same contraction order as the pipeline (columns first), in float32.
  x = np.einsum("nchw,xw->nchx", x, a_x)
  x = np.einsum("yh,nchx->nyxc", a_y, x)
  if data_cfg.gray_scale:   # Franke --gray_scale: channel mean after standardising
    x = x.mean(axis=-1, keepdims=True)
  return np.ascontiguousarray(x, np.float32)


def _rows(values, n: int, width: int, name: str, default: np.ndarray) -> np.ndarray:
  """[n, width] float32 from user values (None = the default on every row)."""
  if values is None:
    return np.broadcast_to(default.astype(np.float32), (n, width)).copy()
  x = np.asarray(values, np.float32)
  if x.shape != (n, width):
    raise ValueError(f"{name} must have shape [n, {width}] = [{n}, {width}] (one row per image), "
                     f"got {list(x.shape)}")
  bad_rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
  if bad_rows.size:
    raise ValueError(f"{name} holds NaN or inf values (rows {bad_rows[:5].tolist()})")
  return x


# ---------------------------------------------------------------------------------------------
# The forward pass of one mouse.


def _per_mouse_mask(full_params, one_params, num_mice: int):
  """True for the leaves stacked on the mouse axis (readouts, shifters, mode-4 B-MLPs).

  Found by comparing the run's model with a one-mouse model of the same config (one mouse with
  N_max neurons): stacked leaves are [M, ...] in one and [1, ...] in the other, shared ones agree.
  """
  def stacked(full, one):
    if full.shape == one.shape:
      return False
    if full.shape[1:] == one.shape[1:] and full.shape[0] == num_mice and one.shape[0] == 1:
      return True
    raise ValueError(f"cannot slice a parameter of shape {full.shape} to one mouse {one.shape}")
  return jax.tree.map(stacked, full_params, one_params)


def _select_neurons(state, neurons_K):
  """The readouts' per-neuron rows `neurons_K` of a one-mouse state ([1, N_max, ...] -> [1, K, ...])."""
  per_neuron = set(readout.PER_NEURON_PARAMS) | {"source_grid"}

  def select(path, x):
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    if "readouts" in names and per_neuron & set(names) and "grid_predictor" not in names:
      return jnp.take(x, neurons_K, axis=1)
    return x
  return jax.tree_util.tree_map_with_path(select, state)


def _forward(params, buffers, mouse, image_BxHxWxC, behavior_Bx3, pupil_Bx2, neurons_K=None, *,
             members: int = 1, **kwargs):
  """Eval-mode prediction [B, N_max] (and attention [B, L, H, T, T]) of mouse `mouse` (traced);
  with `neurons_K`, only those neurons' responses [B, K] (the readout computes nothing else).
  An ensemble (members > 1, a leading member axis on params and buffers) gives the members'
  average prediction (and average attention maps)."""
  one = functools.partial(_member_forward, **kwargs)
  if members == 1:
    return one(params, buffers, mouse, image_BxHxWxC, behavior_Bx3, pupil_Bx2, neurons_K)
  out = jax.vmap(one, in_axes=(0, 0) + (None,) * 5)(
      params, buffers, mouse, image_BxHxWxC, behavior_Bx3, pupil_Bx2, neurons_K)
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), out)


def _member_forward(params, buffers, mouse, image_BxHxWxC, behavior_Bx3, pupil_Bx2, neurons_K, *,
                    graphdef, params_mask, buffers_mask, return_attention: bool):
  """_forward of one model."""
  def take(x, stacked):
    return jax.lax.dynamic_slice_in_dim(x, mouse, 1, axis=0) if stacked else x
  params = jax.tree.map(take, params, params_mask)
  buffers = jax.tree.map(take, buffers, buffers_mask)
  if neurons_K is not None:
    params, buffers = _select_neurons(params, neurons_K), _select_neurons(buffers, neurons_K)
  model = nnx.merge(graphdef, params, buffers)
  pred, aux = model(image_BxHxWxC[None], behavior_Bx3[None], pupil_Bx2[None], train=False,
                    return_attention=return_attention)
  if return_attention:
    return pred[0], aux["attention"][0]
  return pred[0]


def _padded_size(n: int, batch_size: int) -> int:
  """The compiled batch: batch_size, or the next power of two for small requests (few compiles)."""
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


class Predictor:
  """A restored run: the model, its config and what it recorded about each mouse."""

  def __init__(self, config: ml_collections.ConfigDict, run: dict, params, buffers, *,
               device: jax.Device, step: int, path: str):
    self.config = config
    self.run = run
    self.step = step
    self.path = path
    self.device = device
    self.image_hwc = tuple(int(v) for v in run["image_hwc"])
    self.records = [MouseRecord.from_run(i, m) for i, m in enumerate(run["mice"])]
    self.mice = [r.name for r in self.records]
    model_cfg = ModelConfig.from_config(run["config"]["model"])
    counts = [r.neurons for r in self.records]
    self.n_max = max(counts)
    self.params, self.buffers = params, buffers
    # An ensemble: predictions average its members; `model` (figures of readout positions,
    # the core's kind) is member 0.
    self.members = int(run["config"].get("train", {}).get("ensemble_size", 1))
    if self.members > 1:
      params, buffers = jax.tree.map(lambda x: x[0], (params, buffers))
    self.model = nnx.merge(_abstract_model(model_cfg, counts, self.image_hwc)[0], params, buffers)
    # One program for every mouse: it slices the mouse's readout / shifter (/ B-MLP) out of the
    # stacks (the mouse index is a traced argument) and runs a one-mouse model, so the core sees
    # only this mouse's images instead of a [M, B] batch padded with the other mice.
    one_graphdef, one_params, one_buffers = _abstract_model(model_cfg, [self.n_max],
                                                            self.image_hwc)
    masks = {"params_mask": _per_mouse_mask(params, one_params, len(counts)),
             "buffers_mask": _per_mouse_mask(buffers, one_buffers, len(counts))}
    self._forward = {
        attention: jax.jit(functools.partial(_forward, graphdef=one_graphdef,
                                             return_attention=attention, members=self.members,
                                             **masks))
        for attention in (False, True)}

  @classmethod
  def from_workdir(cls, workdir: str, *, which: str = "best", step: int | None = None,
                   device: str | jax.Device | None = None) -> Predictor:
    """Restore `<workdir>/best` (or `latest`: `<workdir>/checkpoints`), newest step or `step`.

    device: a jax.Device or a platform name ("cpu", "gpu", "tpu"); None = JAX's default device.
    """
    if isinstance(device, str):
      try:
        device = jax.devices(device)[0]
      except RuntimeError:   # JAX: "Unknown backend" / "Backend 'gpu' failed to initialize"
        have = sorted({d.platform for d in jax.devices()})
        raise ValueError(f"--device {device}: no such device on this host (available: "
                         f"{', '.join(have)})") from None
    device = device or jax.devices()[0]
    path = checkpoint_dir(workdir, which)
    manager, step = _open(path, step)
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      run = (meta or {}).get("run") or {}
      if not run.get("mice"):
        raise ValueError(f"{path}/{step}: the checkpoint does not record its config and mice "
                         "(written before checkpoints carried meta['run']); re-save it with the "
                         "current train.py")
      model_cfg = ModelConfig.from_config(run["config"]["model"])
      counts = [int(m["neurons"]) for m in run["mice"]]
      graphdef, params, buffers = _abstract_model(model_cfg, counts, run["image_hwc"])
      target = checkpoints.stacked(jax.eval_shape(lambda: checkpoints.new_state(
          nnx.merge(graphdef, params, buffers), checkpoints.make_optimizer_for_restore())),
          int(run["config"].get("train", {}).get("ensemble_size", 1)))
      # Every leaf onto the one chosen device, whatever sharding the training run used.
      sharding = jax.sharding.SingleDeviceSharding(device)
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            target)
      state = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target))).state
    finally:
      manager.close()
    config = ml_collections.ConfigDict(run["config"])
    return cls(config, run, state["params"], state["buffers"], device=device, step=step,
               path=os.path.join(path, str(step)))

  # -------------------------------------------------------------------------------------------

  def mouse(self, mouse: str) -> MouseRecord:
    """The record of a mouse given by name (V1T id or data key) or data key."""
    for r in self.records:
      if mouse in (r.name, r.data_key):
        return r
    known = ", ".join(r.name if r.name == r.data_key else f"{r.name} ({r.data_key})"
                      for r in self.records)
    raise ValueError(f"unknown mouse {mouse!r}; this checkpoint ({self.path}) knows: {known}")

  def neuron_ids(self, mouse: str) -> np.ndarray:
    """The mouse's unit ids: the columns of its predictions."""
    return self.mouse(mouse).unit_ids.copy()

  def preprocess(self, mouse: str, images) -> np.ndarray:
    """Raw pixels -> model inputs [n, h, w, c]: an array [n, C, H, W] or a list of [C, H, W]
    arrays of any sizes (each resized to the model's input)."""
    record = self.mouse(mouse)
    channels = record.image_chw[0]
    if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)):
      images = np.asarray(images)
      if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"images must be raw pixels [n, C, H, W] with C={channels} for mouse "
                         f"{record.name} (its dataset's images are {list(record.image_chw)}), "
                         f"got shape {list(images.shape)}")
      stacks = [(np.arange(len(images)), images)]
    else:   # images of several sizes: preprocess each size group
      by_size = {}
      for i, im in enumerate(images):
        if np.ndim(im) != 3 or np.shape(im)[0] != channels:
          raise ValueError(f"image {i} must be [C, H, W] with C={channels} for mouse "
                           f"{record.name}, got shape {list(np.shape(im))}")
        by_size.setdefault(np.shape(im), []).append(i)
      stacks = [(np.array(idx), np.stack([np.asarray(images[i]) for i in idx]))
                for idx in by_size.values()]
    n = sum(len(idx) for idx, _ in stacks)
    if n == 0:
      raise ValueError("no images to predict")
    h, w, c = self.image_hwc
    out = np.zeros((n, h, w, c), np.float32)
    for idx, stack in stacks:
      if min(stack.shape[-2:]) < 1:
        raise ValueError(f"images of shape {list(stack.shape[1:])} are empty")
      if not np.all(np.isfinite(stack)):
        raise ValueError("images hold NaN or inf pixels")
      out[idx] = preprocess_images(stack, record, self.config.data, self.image_hwc)
    return out

  def normalise_behavior(self, mouse: str, n: int, behavior=None, pupil_center=None):
    """Raw behaviour [n, 3] / pupil centre [n, 2] (None = the dataset means) -> model inputs.

    A mouse recorded without behaviour (the stimulus-only SENSORIUM mouse) was trained on zeros;
    its scale is 0, so it gets zeros whatever is passed.
    """
    r = self.mouse(mouse)
    b = _rows(behavior, n, 3, "behavior", r.behavior_mean)
    p = _rows(pupil_center, n, 2, "pupil_center", r.pupil_center_mean)
    return b * r.behavior_scale, (p - r.pupil_mean) * r.pupil_scale

  def predict(self, mouse: str, images, behavior=None, pupil_center=None, *, batch_size: int = 64,
              return_attention: bool = False):
    """Standardised responses [n, neurons] of `mouse` (and attention [n, L, H, T, T]).

    images: raw pixels [n, C, H, W] (or a list of [C, H, W] of any sizes); behavior [n, 3] and
    pupil_center [n, 2]: raw values, None = the dataset means.
    """
    model_images = self.preprocess(mouse, images)
    b, p = self.normalise_behavior(mouse, len(model_images), behavior, pupil_center)
    return self.predict_model_inputs(mouse, model_images, b, p, batch_size=batch_size,
                                     return_attention=return_attention)

  def response_fn(self, mouse: str, neurons: Sequence[int] | None = None):
    """A pure, differentiable function (image [B, h, w, c], behavior [B, 3], pupil [B, 2]) ->
    responses [B, neurons] of `mouse` on model inputs (for jax.grad / vmap, in-silico work).
    `neurons`: only these (in this order), computing no other neuron's readout."""
    record = self.mouse(mouse)
    forward, index = self._forward[False], jnp.int32(record.index)
    selected = None
    if neurons is not None:
      selected = np.asarray(neurons, np.int32).reshape(-1)
      if selected.size == 0 or selected.min() < 0 or selected.max() >= record.neurons:
        raise ValueError(f"neurons must be in [0, {record.neurons}) for {record.name}, got "
                         f"{list(selected)}")
      selected = jnp.asarray(selected)

    def respond(image_BxHxWxC, behavior_Bx3, pupil_Bx2):
      pred = forward(self.params, self.buffers, index, image_BxHxWxC, behavior_Bx3, pupil_Bx2,
                     selected)
      return pred if selected is not None else pred[:, : record.neurons]
    return respond

  def predict_model_inputs(self, mouse: str, image_NxHxWxC, behavior_Nx3, pupil_Nx2, *,
                           batch_size: int = 64, return_attention: bool = False):
    """`predict` on inputs already normalised as the input pipeline's batches."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    record = self.mouse(mouse)
    n = len(image_NxHxWxC)
    if tuple(np.shape(image_NxHxWxC)[1:]) != self.image_hwc:
      raise ValueError(f"model inputs must be [n, {', '.join(map(str, self.image_hwc))}], got "
                       f"{list(np.shape(image_NxHxWxC))}")
    size = _padded_size(n, batch_size)
    forward = self._forward[return_attention]
    preds, attention = [], []
    for start in range(0, n, size):
      rows = slice(start, min(start + size, n))
      pad = size - (rows.stop - rows.start)
      batch = [jax.device_put(np.pad(np.asarray(x[rows], np.float32),
                                     [(0, pad)] + [(0, 0)] * (np.ndim(x) - 1)), self.device)
               for x in (image_NxHxWxC, behavior_Nx3, pupil_Nx2)]
      out = forward(self.params, self.buffers, jnp.int32(record.index), *batch)
      pred = out[0] if return_attention else out
      preds.append(np.asarray(pred)[: size - pad, : record.neurons])
      if return_attention:
        attention.append(np.asarray(out[1])[: size - pad])
    pred = np.concatenate(preds)
    return (pred, np.concatenate(attention)) if return_attention else pred


def _abstract_model(model_cfg: ModelConfig, counts: Sequence[int], image_hwc):
  """(graphdef, params, buffers) of a V1T with these mice, shapes only."""
  return checkpoints.split_model(abstract_model(model_cfg, counts, image_hwc))


# ---------------------------------------------------------------------------------------------
# Reading user files.


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _read_png(path: str) -> np.ndarray:
  """One PNG as grey levels [1, H, W] float32 on the 0-255 scale (16-bit PNGs rescaled)."""
  try:
    from PIL import Image
  except ImportError:
    Image = None
  if Image is not None:
    with Image.open(path) as im:
      if im.mode.startswith("I;16") or im.mode == "I":
        x = np.asarray(im, np.float64) / 257.0
      else:
        x = np.asarray(im.convert("L"), np.float64)   # ITU-R 601 luma for colour files
  else:
    try:
      import imageio.v3 as iio
    except ImportError as e:
      raise ImportError("reading PNG files needs Pillow or imageio (pip install pillow)") from e
    x = np.asarray(iio.imread(path), np.float64)
    if x.ndim == 3:   # colour: luma like PIL's "L" (alpha ignored)
      x = x[..., :3] @ np.array([0.299, 0.587, 0.114]) if x.shape[-1] >= 3 else x[..., 0]
    if x.max(initial=0) > 255:
      x = x / 257.0
  return x.astype(np.float32)[None]


def read_images(path: str) -> tuple[list[np.ndarray] | np.ndarray, list[str] | None]:
  """A .npy stack [n, C, H, W], or the PNG files of a folder ([1, H, W] each) and their names."""
  if os.path.isdir(path):
    names = sorted((f for f in os.listdir(path) if f.lower().endswith(".png")), key=_natural_key)
    if not names:
      raise FileNotFoundError(f"{path}: no .png files in this folder")
    images = []
    for name in names:
      try:
        images.append(_read_png(os.path.join(path, name)))
      except OSError as e:
        raise ValueError(f"{os.path.join(path, name)}: not a readable PNG file ({e})") from e
    return images, names
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file or folder (expected a .npy stack [n, C, H, W] "
                            "or a folder of PNG files)")
  return _load_npy(path, "--images"), None


def _load_npy(path: str, flag: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{flag} {path}: no such file")
  try:
    x = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise ValueError(f"{flag} {path}: not a plain .npy array ({e})") from e
  if not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"{flag} {path}: expected a numeric array, got dtype {x.dtype}")
  return x


def _stem(out: str) -> str:
  return out[: -len(".npy")] if out.endswith(".npy") else out


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m v1t_jax.predict",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="run directory of launch_train.py")
  parser.add_argument("--mouse", required=True, help="mouse name (V1T id) or data key")
  parser.add_argument("--images", required=True,
                      help=".npy [n, C, H, W] raw pixels, or a folder of PNG files")
  parser.add_argument("--behavior", help=".npy [n, 3] raw behaviour (default: the dataset mean)")
  parser.add_argument("--pupil_center",
                      help=".npy [n, 2] raw pupil centre (default: the dataset mean)")
  parser.add_argument("--out", required=True, help="output .npy [n, neurons]")
  parser.add_argument("--which", default="best", choices=sorted(CHECKPOINT_DIRS))
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--device", default=None, help="cpu, gpu or tpu (default: JAX's default)")
  parser.add_argument("--compilation_cache", default=None, help=cli.CACHE_HELP)
  args = parser.parse_args(argv)
  cli.compilation_cache(args.compilation_cache)

  predictor = Predictor.from_workdir(args.workdir, which=args.which, step=args.step,
                                     device=args.device)
  record = predictor.mouse(args.mouse)   # an unknown mouse fails before any file is read
  images, names = read_images(args.images)
  behavior = None if args.behavior is None else _load_npy(args.behavior, "--behavior")
  pupil = None if args.pupil_center is None else _load_npy(args.pupil_center, "--pupil_center")
  pred = predictor.predict(record.name, images, behavior, pupil, batch_size=args.batch_size)
  stem = _stem(args.out)
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  np.save(stem + ".npy", pred)
  np.save(stem + ".neuron_ids.npy", predictor.neuron_ids(record.name))
  if names is not None:
    with open(stem + ".images.txt", "w") as f:
      f.write("\n".join(names) + "\n")
  summary = {"out": stem + ".npy", "neuron_ids": stem + ".neuron_ids.npy", "mouse": record.name,
             "data_key": record.data_key, "shape": list(pred.shape),
             "checkpoint": predictor.path}
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError, ImportError) as e:
    sys.exit(f"error: {e}")
