r"""Import the original V1T's PyTorch checkpoints (model_spec.md §10), and export ours back.

  python -m v1t_jax.import_torch --checkpoint=RUN/ckpt/model_state.pt --args=RUN/args.yaml \
      --data_dir=data/sensorium_tfds --workdir=runs/v1t_imported
  python launch_train.py --config=runs/v1t_imported/imported_config.py \
      --workdir=runs/v1t_imported --mode=evaluate

  python -m v1t_jax.import_torch --export --workdir=runs/v1t --checkpoint=model_state.pt

Import reads a checkpoint (the original's {"epoch", "value", "model", ...} dict or a bare
state_dict; .pt/.pth/.bin need torch, `pip install -e ".[torch]"`; .npz and .safetensors do not),
builds the config from the run's `args.yaml` and the mice of `--data_dir`, maps every tensor into
our variables and writes step 0 into `<workdir>/checkpoints` and `<workdir>/best` (fresh Adam
state), plus `imported_config.py` (the config to pass to launch_train.py) and
`import_report.json`. Anything that does not fit (missing, unexpected or misshapen keys, buffers
that contradict args.yaml, mice that are not in the data) is one error that lists every offender.

The mapping itself works on a dict of NumPy arrays (`import_state_dict`, `export_state_dict`), so
it needs neither torch nor data. One table (`key_table`) lists every key of the original for a
given model: its variable path here, the layout conversion and the mouse index on our stacked
per-mouse axis. Both key namings of the original are accepted: HEAD's (`b-mlp.models.share`,
mice S0, S1, A-E, F-O) and the older one (`b-mlp.model`, mice "0"-"6", Franke scans as
"static<scan>"); model_spec.md leaves open which one the published weights use.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from v1t_jax import dataset_meta

# Old checkpoints (model_spec.md §10) number the Sensorium mice.
OLD_MOUSE_IDS = {"0": "S0", "1": "S1", "2": "A", "3": "B", "4": "C", "5": "D", "6": "E"}
_OLD_BY_NAME = {v: k for k, v in OLD_MOUSE_IDS.items()}
_DATA_KEYS = {v: k for k, v in dataset_meta.V1T_IDS.items()}   # V1T id -> data key
# Prefixes that wrappers add to every key: torch.compile and (Distributed)DataParallel. The
# original saves the plain module, so these only appear in re-saved checkpoints (tolerated).
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CONFIG_FILE = "imported_config.py"
REPORT_FILE = "import_report.json"


class CheckpointMismatch(ValueError):
  """A checkpoint that does not fit the model; the message lists every offending key."""


# ---------------------------------------------------------------------------------------------
# Layout conversions: original tensor <-> our variable slice (one mouse, real neurons only).


def _features_in(w):   # (1, C, 1, N) -> [N, C]
  return w[0, :, 0, :].T


def _features_out(x):  # [N, C] -> (1, C, 1, N)
  return x.T[None, :, None, :]


CONVERSIONS = {
    # kind: (original -> ours, ours -> original)
    "same": (lambda w: w, lambda x: x),
    # PyTorch Linear weight (out, in) -> Flax kernel (in, out).
    "linear": (lambda w: w.T, lambda x: x.T),
    # Conv2d weight (D, C, P, P) -> HWIO kernel (P, P, C, D).
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),
    "features": (_features_in, _features_out),
    # sigma (1, N, 2, 2) -> [N, 2, 2]; _mu (1, N, 1, 2) -> [N, 2].
    "sigma": (lambda w: w[0], lambda x: x[None]),
    "mu": (lambda w: w[0, :, 0, :], lambda x: x[None, :, None, :]),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one tensor of the original lives here."""
  path: tuple            # our variable path, e.g. ("core", "blocks", 0, "mha", "to_qkv", "kernel")
  kind: str              # a key of CONVERSIONS
  mouse: int | None = None   # index on the leading mouse axis of a stacked per-mouse variable
  rows: bool = False     # axis 1 (after the mouse axis) is padded to N_max: keep N_m rows


# ---------------------------------------------------------------------------------------------
# Mouse ids.


def checkpoint_mice(state_dict: Mapping[str, Any]) -> list[str]:
  """The mouse ids of a state_dict, in the order of its `readouts.<id>.` keys (the original's
  dict order, i.e. its training order)."""
  ids = []
  for key in state_dict:
    parts = key.split(".")
    if parts[0] == "readouts" and len(parts) > 2 and parts[1] not in ids:
      ids.append(parts[1])
  return ids


def mouse_name(checkpoint_id: str) -> str:
  """Our name (V1T id, or the data key of other mice) of a checkpoint's mouse id."""
  if checkpoint_id in OLD_MOUSE_IDS:   # old numbering "0"-"6" = S0, S1, A-E
    return OLD_MOUSE_IDS[checkpoint_id]
  if checkpoint_id.startswith("static"):   # old Franke ids are scan stems, e.g. static25311-10-26
    key = checkpoint_id[len("static"):]
    return dataset_meta.V1T_IDS.get(key, key)
  return checkpoint_id


def old_mouse_id(name: str, data_key: str | None = None) -> str:
  """The older checkpoints' id of one of our mice (the inverse of `mouse_name`)."""
  if name in _OLD_BY_NAME:
    return _OLD_BY_NAME[name]
  return "static" + (data_key or _DATA_KEYS.get(name, name))


def match_mice(checkpoint_ids: Sequence[str], available: Sequence[str]) -> list[str]:
  """Our names for the checkpoint's mice; every one must be among `available` (names or data
  keys of the converted data), else one error naming all unknown mice."""
  known = [dataset_meta.V1T_IDS.get(a, a) for a in available]
  names = [mouse_name(i) for i in checkpoint_ids]
  unknown = [f"{i!r} (= {n})" if n != i else repr(i)
             for i, n in zip(checkpoint_ids, names) if n not in known and n not in available]
  if unknown:
    raise CheckpointMismatch(
        f"unknown mice: the checkpoint has readouts for {', '.join(unknown)}, which are not in "
        f"the data (available: {known})")
  return names


# ---------------------------------------------------------------------------------------------
# The key table.


def _linear(table, key, path, mouse=None, bias=True):
  table[f"{key}.weight"] = Entry(path + ("kernel",), "linear", mouse)
  if bias:
    table[f"{key}.bias"] = Entry(path + ("bias",), "same", mouse)


def _layer_norm(table, key, path):
  table[f"{key}.weight"] = Entry(path + ("scale",), "same")
  table[f"{key}.bias"] = Entry(path + ("bias",), "same")


def key_table(model, mouse_ids: Sequence[str], *, old_naming: bool = False) -> dict[str, Entry]:
  """Every parameter key of the original for `model` (plus the `source_grid` buffers).

  mouse_ids[m] is the checkpoint's id of our mouse m. `old_naming` spells the B-MLPs as before
  Mar 2023 (`b-mlp.model.*`); the ids themselves are whatever the checkpoint uses.
  """
  config = model.config
  if len(mouse_ids) != len(model.neuron_counts):
    raise ValueError(f"{len(mouse_ids)} mouse ids for a model of {len(model.neuron_counts)} mice")
  table: dict[str, Entry] = {}
  if config.core == "stacked2d":
    from v1t_jax import stacked2d
    for key, (path, kind) in stacked2d.torch_keys(config.stacked2d, prefix="core").items():
      if kind != "skip":   # num_batches_tracked: unused while momentum is set
        table[key] = Entry(("core",) + tuple(path), kind)
  else:
    _vit_keys(table, config, mouse_ids, old_naming)
  _per_mouse_keys(table, model, mouse_ids)
  return table


def _vit_keys(table: dict, config, mouse_ids: Sequence[str], old_naming: bool):
  """The ViT core's keys (model_spec.md §10)."""
  bias = not config.disable_bias
  embed, core = ("core", "patch_embedding"), "core.patch_embedding"
  table[f"{core}.cls_token"] = Entry(embed + ("cls_token",), "same")
  table[f"{core}.pos_embedding"] = Entry(embed + ("pos_embedding",), "same")
  if config.patch_mode == 0:   # Sequential(Unfold, Rearrange, Linear): the Linear is index 2
    _linear(table, f"{core}.projection.2", embed + ("projection",))
  else:                        # patch_mode 1: Sequential(Conv2d, Rearrange)
    table[f"{core}.projection.0.weight"] = Entry(embed + ("projection", "kernel"), "conv")
    table[f"{core}.projection.0.bias"] = Entry(embed + ("projection", "bias"), "same")
  for i in range(config.num_blocks):
    key, path = f"core.transformer.blocks.{i}", ("core", "blocks", i)
    _layer_norm(table, f"{key}.mha.layer_norm", path + ("mha", "layer_norm"))
    _linear(table, f"{key}.mha.to_qkv", path + ("mha", "to_qkv"), bias=False)
    _linear(table, f"{key}.mha.projection.0", path + ("mha", "projection"), bias=bias)
    if config.use_lsa:   # learnable per-head temperature
      table[f"{key}.mha.scale"] = Entry(path + ("mha", "scale"), "same")
    _layer_norm(table, f"{key}.mlp.model.0", path + ("mlp", "layer_norm"))
    _linear(table, f"{key}.mlp.model.1", path + ("mlp", "fc1"), bias=bias)
    _linear(table, f"{key}.mlp.model.4", path + ("mlp", "fc2"), bias=bias)
    if config.behavior_dim:
      bmlp = f"{key}.b-mlp.model" if old_naming else f"{key}.b-mlp.models"
      if config.behavior_mode == 4:   # one B-MLP per mouse, stacked on our mouse axis
        owners = [(f"{bmlp}.{mid}", m) for m, mid in enumerate(mouse_ids)]
      else:                           # shared; old naming has no `share` level
        owners = [(bmlp if old_naming else f"{bmlp}.share", None)]
      for prefix, m in owners:
        _linear(table, f"{prefix}.0", path + ("bmlp", "fc1"), m, bias=bias)
        _linear(table, f"{prefix}.3", path + ("bmlp", "fc2"), m, bias=bias)


def _per_mouse_keys(table: dict, model, mouse_ids: Sequence[str]):
  """Shifters and readouts of every mouse (any core)."""
  config = model.config
  for m, mid in enumerate(mouse_ids):
    if model.shifters is not None:
      for index, name in (("0", "fc1"), ("2", "fc2"), ("4", "fc3")):
        _linear(table, f"core_shifter.{mid}.mlp.{index}", ("shifters", name), m)
    key = f"readouts.{mid}"
    table[f"{key}.features"] = Entry(("readouts", "features"), "features", m, rows=True)
    table[f"{key}.sigma"] = Entry(("readouts", "sigma"), "sigma", m, rows=True)
    table[f"{key}.bias"] = Entry(("readouts", "bias"), "same", m, rows=True)
    if config.disable_grid_predictor:
      table[f"{key}._mu"] = Entry(("readouts", "mu"), "mu", m, rows=True)
    else:
      # A buffer we load rather than recompute (the exact values the weights were trained on).
      table[f"{key}.source_grid"] = Entry(("readouts", "source_grid"), "same", m, rows=True)
      _linear(table, f"{key}.mu_transform.0", ("readouts", "grid_predictor", "fc1"), m)
      _linear(table, f"{key}.mu_transform.2", ("readouts", "grid_predictor", "fc2"), m)


def buffer_table(model, mouse_ids: Sequence[str]) -> dict[str, float | None]:
  """The original's buffers that we regenerate from the config (model_spec.md §10): key ->
  the value args.yaml implies, or None where the value is not checked.

  They are optional on import (a bare state_dict of parameters is fine) and checked where the
  spec states their value, so an args.yaml of another run is caught. Readout and shifter
  `reg_scale` buffers are assumed to hold readout_reg_scale / shifter_reg_scale (only used when
  exporting); `image_cropper.grid` and the LSA mask buffers are accepted as they are.
  """
  config = model.config
  out: dict[str, float | None] = {"image_cropper.grid": None, "elu1.one": 1.0}
  for mid in mouse_ids:
    out[f"readouts.{mid}.reg_scale"] = None
    if model.shifters is not None:
      out[f"core_shifter.{mid}.reg_scale"] = None
  if config.core == "stacked2d":
    from v1t_jax import stacked2d
    out["core.gamma_input"] = config.stacked2d.core_reg_input
    out["core.gamma_hidden"] = config.stacked2d.core_reg_hidden
    out["core._input_weights_regularizer.laplace.filter"] = None
    for key, (_, kind) in stacked2d.torch_keys(config.stacked2d, prefix="core").items():
      if kind == "skip":
        out[key] = None
    return out
  out.update({
      "core.reg_scale": config.core_reg_scale,
      "core.transformer.drop_path.keep_prop": 1.0 - config.drop_path,
  })
  for i in range(config.num_blocks):
    key = f"core.transformer.blocks.{i}.mha"
    if config.use_lsa:
      out[f"{key}.mask"] = out[f"{key}.max_value"] = None
    else:
      out[f"{key}.scale"] = config.emb_dim ** -0.5
  return out


def _torch_shape(entry: Entry, our_shape: tuple, neuron_counts: Sequence[int]) -> tuple:
  """The original's shape of one entry, from our (stacked, padded) variable shape."""
  shape = list(our_shape[1:] if entry.mouse is not None else our_shape)
  if entry.rows:
    shape[0] = neuron_counts[entry.mouse]
  return CONVERSIONS[entry.kind][1](np.broadcast_to(np.float32(0), shape)).shape


# ---------------------------------------------------------------------------------------------
# Model variables.


def _variables(model) -> dict[tuple, Any]:
  from flax import nnx
  return dict(nnx.to_flat_state(nnx.state(model)))


def _assign(model, values: Mapping[tuple, np.ndarray]):
  """Replace the model's variables at `values`' paths (all others unchanged)."""
  import jax.numpy as jnp
  from flax import nnx
  flat = [(p, v.replace(jnp.asarray(values[p], v.get_value().dtype)) if p in values else v)
          for p, v in nnx.to_flat_state(nnx.state(model))]
  nnx.update(model, nnx.from_flat_state(flat))


def detect_old_naming(state_dict: Mapping[str, Any]) -> bool:
  """True when the B-MLPs are spelled `b-mlp.model.*` (checkpoints before Mar 2023)."""
  return any(".b-mlp.model." in k for k in state_dict)


# ---------------------------------------------------------------------------------------------
# Import.


def _shape_problems(state_dict, table, variables, neuron_counts) -> list[str]:
  problems = []
  for key, entry in table.items():
    if key not in state_dict:
      continue
    want = _torch_shape(entry, variables[entry.path].get_value().shape, neuron_counts)
    got = tuple(np.shape(state_dict[key]))
    if got != want:
      hint = f" (the data has {neuron_counts[entry.mouse]} neurons for this mouse)" \
          if entry.rows else ""
      problems.append(f"{key}: shape {got}, expected {want}{hint}")
  return problems


def _buffer_problems(state_dict, buffers) -> list[str]:
  problems = []
  for key, value in buffers.items():
    if value is None or key not in state_dict:
      continue
    got = np.asarray(state_dict[key], np.float64)
    if got.size != 1 or not np.isclose(got.item(), value, rtol=1e-5, atol=1e-8):
      problems.append(f"{key}: {got.tolist()}, but args.yaml gives {value:.6g}")
  return problems


def check_state_dict(model, state_dict: Mapping[str, np.ndarray], mouse_ids: Sequence[str],
                     *, old_naming: bool) -> dict[str, Entry]:
  """The key table, after checking the state_dict against it; raises CheckpointMismatch
  listing missing keys, unexpected keys, shape mismatches and contradicting buffers."""
  table = key_table(model, mouse_ids, old_naming=old_naming)
  buffers = buffer_table(model, mouse_ids)
  variables = _variables(model)
  uncovered = sorted(set(variables) - {e.path for e in table.values()})
  if uncovered:   # the table and the model disagree: a bug here, not in the checkpoint
    raise AssertionError(f"model variables without a checkpoint key: {uncovered}")
  missing = [k for k in table if k not in state_dict]
  unexpected = [k for k in state_dict if k not in table and k not in buffers]
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    hint = ""
    if any(k.startswith("image_cropper.image_shifter.") for k in unexpected):
      hint = " [image_cropper.image_shifter.* belong to shift_mode 1/3/4, which is not ported]"
    problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}{hint}")
  problems += _shape_problems(state_dict, table, variables, model.neuron_counts)
  problems += _buffer_problems(state_dict, buffers)
  if problems:
    naming = "old (b-mlp.model)" if old_naming else "HEAD (b-mlp.models)"
    raise CheckpointMismatch(
        f"the checkpoint does not fit the model built from args.yaml (mice {list(mouse_ids)}, "
        f"{naming} key naming):\n  " + "\n  ".join(problems))
  return table


def _source_grid_problems(model, state_dict, table, atol) -> list[str]:
  """Mice whose stored source grid differs from the one our data's coordinates give: the
  neurons are then not the same (another dataset, or another neuron order)."""
  grids = np.asarray(_variables(model)[("readouts", "source_grid")].get_value())
  out = []
  for key, entry in table.items():
    if entry.path == ("readouts", "source_grid"):
      n = model.neuron_counts[entry.mouse]
      diff = np.abs(np.asarray(state_dict[key], np.float64) - grids[entry.mouse, :n]).max()
      if diff > atol:
        out.append(f"{key}: differs by up to {diff:.3g} from the data's cell_motor_coordinates")
  return out


def import_state_dict(model, state_dict: Mapping[str, np.ndarray],
                      mouse_ids: Sequence[str] | None = None, *, check_source_grid: bool = True,
                      source_grid_atol: float = 1e-5) -> dict:
  """Load an original state_dict (NumPy arrays) into `model` in place.

  Args:
    model: a V1T built with the checkpoint's config and mice (neuron counts, image shape).
    state_dict: key -> array, either key naming (detected from the B-MLP keys).
    mouse_ids: the checkpoint's id of each of our mice, in our order; default: the
      checkpoint's own readout order.
    check_source_grid: compare each stored source grid with the one the model computed from its
      coordinates (a model built from the run's data); False for a model without real
      coordinates.

  Returns: a small report: naming ("old" for old B-MLP keys or old mouse ids), mouse ids,
    number of tensors loaded, buffers ignored (regenerated from the config).
  """
  mouse_ids = list(checkpoint_mice(state_dict) if mouse_ids is None else mouse_ids)
  old_naming = detect_old_naming(state_dict)
  table = check_state_dict(model, state_dict, mouse_ids, old_naming=old_naming)
  if check_source_grid and not model.config.disable_grid_predictor:
    problems = _source_grid_problems(model, state_dict, table, source_grid_atol)
    if problems:
      raise CheckpointMismatch("the checkpoint's neurons do not match the data:\n  "
                               + "\n  ".join(problems))
  variables = _variables(model)
  # Start from zeros: padded neurons become 0 (finite; masked everywhere), and every real entry
  # is overwritten below (check_state_dict guarantees each key exists).
  values = {p: np.zeros(v.get_value().shape, np.float32) for p, v in variables.items()}
  for key, entry in table.items():
    array = CONVERSIONS[entry.kind][0](np.asarray(state_dict[key], np.float32))
    target = values[entry.path]
    if entry.mouse is not None:
      target = target[entry.mouse]
    target[: array.shape[0]] = array   # rows: the real neurons; otherwise the whole slice
  _assign(model, values)
  old_ids = any(i in OLD_MOUSE_IDS or i.startswith("static") for i in mouse_ids)
  return {"naming": "old" if old_naming or old_ids else "head", "mouse_ids": mouse_ids,
          "keys_loaded": len(table),
          "buffers_ignored": sorted(k for k in state_dict if k not in table)}


# ---------------------------------------------------------------------------------------------
# Export.


def cropper_grid(raw_hw: Sequence[int], center_crop: float) -> np.ndarray:
  """image_cropper.grid (1, Hc, Wc, 2): x = linspace(-s, s, Wc) along the width, y along the
  height (model_spec.md §2.4)."""
  height, width = (int(n * center_crop) for n in raw_hw)
  y, x = np.meshgrid(np.linspace(-center_crop, center_crop, height),
                     np.linspace(-center_crop, center_crop, width), indexing="ij")
  return np.stack([x, y], axis=-1)[None].astype(np.float32)


def export_state_dict(model, mouse_ids: Sequence[str], *, old_naming: bool = False,
                      raw_image_hw: Sequence[int] | None = None,
                      center_crop: float = 1.0) -> dict[str, np.ndarray]:
  """Our model as the original's state_dict (float32 NumPy arrays), buffers included.

  mouse_ids: the id each of our mice gets in the keys (e.g. names, or `old_mouse_id` of them).
  raw_image_hw: the data's image size before crop/resize; without it `image_cropper.grid` is
  left out. With use_lsa the attention's mask/max_value buffers are left out (their exact
  layout is not in the spec), so a strict `load_state_dict` needs strict=False there.
  """
  variables = {p: np.asarray(v.get_value()) for p, v in _variables(model).items()}
  out = {}
  for key, entry in key_table(model, mouse_ids, old_naming=old_naming).items():
    value = variables[entry.path]
    if entry.mouse is not None:
      value = value[entry.mouse]
    if entry.rows:
      value = value[: model.neuron_counts[entry.mouse]]
    out[key] = np.ascontiguousarray(CONVERSIONS[entry.kind][1](value), np.float32)
  config = model.config
  for key, value in buffer_table(model, mouse_ids).items():
    if key.endswith(".reg_scale") and key.startswith("readouts."):
      value = config.readout_reg_scale
    elif key.endswith(".reg_scale") and key.startswith("core_shifter."):
      value = config.shifter_reg_scale
    if value is not None:
      out[key] = np.asarray(value, np.float32)
  if raw_image_hw is not None:
    out["image_cropper.grid"] = cropper_grid(raw_image_hw, center_crop)
  return out


# ---------------------------------------------------------------------------------------------
# Files.


def _strip_wrappers(key: str) -> str:
  changed = True
  while changed:
    changed = False
    for prefix in WRAPPER_PREFIXES:
      if key.startswith(prefix):
        key, changed = key[len(prefix):], True
  return key


def _unwrap(obj, path: str) -> tuple[dict, dict]:
  """(state_dict, info): the original's checkpoint dict keeps the weights under `model` and the
  best validation correlation under `value`; a bare state_dict is taken as it is."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a dict (a checkpoint or a state_dict), got {type(obj)}")
  info = {}
  if isinstance(obj.get("model"), Mapping):
    info = {k: obj[k] for k in ("epoch", "value") if isinstance(obj.get(k), (int, float))}
    obj = obj["model"]
  elif isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  return {_strip_wrappers(k): v for k, v in obj.items()}, info


def _torch_to_numpy(value, key: str, path: str) -> np.ndarray:
  import torch
  if not isinstance(value, torch.Tensor):
    raise ValueError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
  value = value.detach().cpu()
  if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
    value = value.float()   # half / bfloat16 have no (exact) NumPy dtype
  return value.numpy()


def _original_safe_globals(torch) -> tuple[list, list[str]]:
  """(allow-list, names this torch cannot allow): what the original's checkpoints pickle.

  train.py saves Scheduler.state_dict() (src/v1t/utils/scheduler.py) under `scheduler`: its
  GradScaler (a defaultdict of `_refresh_per_optimizer_state` inside), `args.device` (a
  torch.device) and NumPy scalars (the best validation correlation). Entries are objects or
  (object, "module.name") pairs for names older torch / NumPy versions pickled (torch >= 2.6).
  """
  import collections
  import importlib
  names = {}   # the name a file pickles -> the object
  for obj in [collections.defaultdict, torch.device, np.dtype] + [
      type(np.dtype(t)) for t in ("f2", "f4", "f8", "i4", "i8", "u1", "?")]:
    names[f"{obj.__module__}.{obj.__qualname__}"] = obj
  for module in ("torch.amp.grad_scaler", "torch.cuda.amp.grad_scaler"):
    try:
      mod = importlib.import_module(module)
    except ImportError:
      continue
    for name in ("GradScaler", "_refresh_per_optimizer_state", "OptState"):
      if hasattr(mod, name):
        obj = getattr(mod, name)
        names.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
        names.setdefault(f"{module}.{name}", obj)
  # torch < 2.3 defined the scaler's helpers in torch.cuda.amp; newer torch moved them.
  for name in ("GradScaler", "_refresh_per_optimizer_state", "OptState"):
    if f"torch.amp.grad_scaler.{name}" in names:
      obj = names[f"torch.amp.grad_scaler.{name}"]
      names.setdefault(f"torch.cuda.amp.grad_scaler.{name}", obj)
  for module in ("numpy._core.multiarray", "numpy.core.multiarray"):   # NumPy 2 / 1
    try:
      scalar = importlib.import_module(module).scalar
    except (ImportError, AttributeError):
      continue
    for alias in ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar"):
      names.setdefault(alias, scalar)
  named = _torch_version(torch) >= (2, 6)   # (object, name) pairs need torch >= 2.6
  allowed, missing = [], []
  for name, obj in names.items():
    if f"{obj.__module__}.{obj.__qualname__}" == name:
      allowed.append(obj)
    elif named:
      allowed.append((obj, name))
    else:
      missing.append(name)
  return allowed, missing


def _torch_version(torch) -> tuple[int, int]:
  try:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
  except ValueError:
    return (0, 0)


def _refused_type(error: Exception) -> str | None:
  """The global torch's weights-only unpickler refused, from its error message."""
  import re
  found = re.search(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(error))   # torch >= 2.4 / older
  return found.group(1) if found else None


def _load_weights_only(torch, path: str):
  """torch.load(weights_only=True) with the original's few pickled types allowed (no code runs)."""
  serialization = torch.serialization
  allowed, missing = _original_safe_globals(torch)
  try:
    if hasattr(serialization, "safe_globals"):   # torch >= 2.5
      with serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)
    if hasattr(serialization, "add_safe_globals"):   # torch 2.4: global list, restored after
      before = serialization.get_safe_globals()
      serialization.add_safe_globals(allowed)
      try:
        return torch.load(path, map_location="cpu", weights_only=True)
      finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(before)
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    refused = _refused_type(e)
    if refused is None:
      raise ValueError(f"{path}: torch.load(weights_only=True) refused it ({e}); if you trust "
                       "the file, pass --trust_pickle") from e
    old = ""
    if not hasattr(serialization, "add_safe_globals"):
      old = (f"; torch {torch.__version__} cannot allow the original's checkpoint types (the "
             "GradScaler, torch.device, NumPy scalars), torch >= 2.4 can")
    elif refused in missing:
      old = f"; torch {torch.__version__} cannot allow it under that old name, torch >= 2.6 can"
    raise ValueError(f"{path}: expected tensors and the original V1T's checkpoint types only, but "
                     f"it pickles {refused}, which weights_only loading refuses{old}; if you "
                     "trust the file, pass --trust_pickle (unpickling can run arbitrary code)"
                     ) from e


def load_state_dict_file(path: str, *, trust_pickle: bool = False) -> tuple[dict, dict]:
  """(state_dict of NumPy arrays, info) from .pt/.pth/.bin/.ckpt (torch), .npz or .safetensors.

  torch files are read with `weights_only=True` (no code runs), allowing only the few objects the
  original's train.py pickles beside the weights (`_original_safe_globals`); a file with any
  other pickled object is only read with trust_pickle=True.
  """
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      return _unwrap({k: z[k] for k in z.files}, path)
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError(f"{path}: reading .safetensors needs `pip install safetensors`") from e
    return _unwrap(load_file(path), path)
  if not path.endswith(TORCH_SUFFIXES):
    raise ValueError(f"{path}: unknown checkpoint format (expected one of "
                     f"{TORCH_SUFFIXES + ('.npz', '.safetensors')})")
  try:
    import torch  # optional: only this function needs it
  except ImportError as e:
    raise ImportError(f"{path}: reading a PyTorch checkpoint needs torch: "
                      "pip install -e '.[torch]' (or save the state_dict as .npz elsewhere)") from e
  if trust_pickle:
    obj = torch.load(path, map_location="cpu", weights_only=False)
  else:
    obj = _load_weights_only(torch, path)
  state_dict, info = _unwrap(obj, path)
  return {k: _torch_to_numpy(v, k, path) for k, v in state_dict.items()}, info


def save_state_dict_file(state_dict: Mapping[str, np.ndarray], path: str,
                         info: Mapping[str, Any] | None = None):
  """.npz (a bare state_dict) or, with torch, a .pt in the original's {"model": ...} layout."""
  if path.endswith(".npz"):
    np.savez(path, **state_dict)
    return
  if not path.endswith(TORCH_SUFFIXES):
    raise ValueError(f"{path}: write .npz, or {'/'.join(TORCH_SUFFIXES)} with torch installed")
  import torch
  model = {k: torch.tensor(np.asarray(v)) for k, v in state_dict.items()}   # copies
  torch.save({**(info or {}), "model": model}, path)


def read_args_yaml(path: str) -> dict:
  """The original's args.yaml (ruamel dump of its argparse namespace) as a plain dict.

  Tags we cannot know (e.g. python/tuple) are read as plain scalars, lists or dicts.
  """
  try:
    import yaml
  except ImportError as e:
    raise ImportError("reading args.yaml needs PyYAML: pip install -e '.[torch]'") from e

  class Loader(yaml.SafeLoader):
    pass

  def any_tag(loader, _suffix, node):
    if isinstance(node, yaml.ScalarNode):
      return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
      return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)

  Loader.add_multi_constructor("", any_tag)
  with open(path) as f:
    args = yaml.load(f, Loader=Loader)
  if not isinstance(args, dict):
    raise ValueError(f"{path}: expected a mapping of the original's flags, got {type(args)}")
  return args


# ---------------------------------------------------------------------------------------------
# Config from args.yaml.

# The original's flag (model_spec.md §12) -> our config field. Every other flag (device, amp,
# plots, wandb, ...) does not change the model or the evaluation and is reported as ignored.
ARGS_TO_CONFIG = {
    **{name: f"model.{name}" for name in (
        "patch_size", "patch_stride", "patch_mode", "emb_dim", "num_heads", "num_blocks",
        "mlp_dim", "p_dropout", "t_dropout", "drop_path", "use_lsa", "disable_bias",
        "behavior_mode", "shift_mode", "disable_grid_predictor", "grid_predictor_dim",
        "bias_mode", "core_reg_scale", "readout_reg_scale", "shifter_reg_scale", "ds_scale")},
    "center_crop": "data.center_crop", "resize_image": "data.resize_image",
    "gray_scale": "data.gray_scale", "limit_data": "data.limit_data",
    "batch_size": "data.batch_size",
    "epochs": "train.num_epochs", "lr": "train.lr", "core_lr": "train.core_lr",
    "adam_beta1": "train.adam_beta1", "adam_beta2": "train.adam_beta2",
    "adam_eps": "train.adam_eps", "seed": "seed",
}
# The stacked2d core's flags (train.py) -> its config section.
STACKED2D_ARGS = {name: f"model.stacked2d.{name}" for name in (
    "num_layers", "dropout", "core_reg_input", "core_reg_hidden", "linear")}
IMPORTABLE = {"core": ("vit", "stacked2d"), "readout": ("gaussian2d",)}


def _lookup(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def _coerce(value, default, flag: str):
  """A YAML value in the type of our config field (ConfigDicts refuse e.g. int for bool)."""
  if value is None or default is None:
    return value
  if isinstance(default, bool):
    if isinstance(value, str):
      return value.strip().lower() in ("1", "true", "yes")
    return bool(value)
  try:
    return type(default)(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"args.yaml: {flag}={value!r} is not a {type(default).__name__}") from e


def config_overrides(args: Mapping[str, Any], *, data_dir: str, mice: Sequence[str]) -> dict:
  """Flattened overrides of configs/default.py that reproduce the original run."""
  from configs import default
  for flag, allowed in IMPORTABLE.items():
    if args.get(flag, allowed[0]) not in allowed:
      raise ValueError(f"args.yaml: --{flag} {args[flag]!r} is not importable (--core vit or "
                       "stacked2d, --readout gaussian2d)")
  if "behavior_mode" not in args:
    raise ValueError("args.yaml: no behavior_mode (a required flag of the original)")
  base = default.get_config()
  out = {}
  core = args.get("core", "vit")
  out["model.core"] = core
  flags = {**ARGS_TO_CONFIG, **(STACKED2D_ARGS if core == "stacked2d" else {})}
  for flag, field in flags.items():
    if flag in args:
      out[field] = _coerce(args[flag], _lookup(base, field), flag)
  out["data.data_dir"] = os.path.abspath(data_dir)
  out["data.mice"] = tuple(mice)
  return out


def config_from_overrides(overrides: Mapping[str, Any]):
  from configs import default
  config = default.get_config()
  config.update_from_flattened_dict(dict(overrides))
  return config


def _check_args_mice(args, names: Sequence[str]):
  """args.yaml's mouse_ids (None = all of the dataset) must be the checkpoint's mice."""
  listed = args.get("mouse_ids")
  if not listed:
    return
  listed = [mouse_name(str(m)) for m in listed]
  if sorted(listed) != sorted(names):
    raise CheckpointMismatch(f"args.yaml lists mice {listed}, the checkpoint has readouts for "
                             f"{list(names)}")


def write_config_file(path: str, overrides: Mapping[str, Any], source: str):
  body = ",\n".join(f"    {k!r}: {v!r}" for k, v in overrides.items())
  text = f'''"""Config of an imported V1T PyTorch run (written by v1t_jax.import_torch).

Checkpoint: {source}

  python launch_train.py --config={path} --workdir={os.path.dirname(path)} --mode=evaluate
"""

from configs import default

OVERRIDES = {{
{body},
}}


def get_config(arg=None):
  del arg
  config = default.get_config()
  config.update_from_flattened_dict(OVERRIDES)
  return config
'''
  with open(path, "w") as f:
    f.write(text)


# ---------------------------------------------------------------------------------------------
# Commands.


def import_checkpoint(checkpoint: str, args_path: str | None, data_dir: str, workdir: str, *,
                      trust_pickle: bool = False, check_source_grid: bool = True) -> dict:
  """The CLI's import: checkpoint + args.yaml + converted data -> an orbax run directory."""
  from v1t_jax import checkpoints, train
  from v1t_jax.model import build_model
  from v1t_jax.plateau import Plateau

  args_path = args_path or os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(checkpoint))), "args.yaml")   # the original's RUN/ckpt/model_state.pt
  workdir = os.path.abspath(workdir)
  for sub in ("checkpoints", "best"):
    d = os.path.join(workdir, sub)
    if os.path.isdir(d) and os.listdir(d):
      raise FileExistsError(f"{d} already holds checkpoints; import into an empty workdir")
  state_dict, info = load_state_dict_file(checkpoint, trust_pickle=trust_pickle)
  args = read_args_yaml(args_path)
  ids = checkpoint_mice(state_dict)
  if not ids:
    raise CheckpointMismatch(f"{checkpoint}: no readouts.<mouse>.* keys; is it a V1T state_dict?")
  names = match_mice(ids, dataset_meta.available_mice(data_dir))
  _check_args_mice(args, names)
  overrides = config_overrides(args, data_dir=data_dir, mice=names)
  config = config_from_overrides(overrides)
  trainer = train.setup(config)
  model = build_model(config, trainer.mice, trainer.image_hwc, config.seed)
  report = import_state_dict(model, state_dict, ids, check_source_grid=check_source_grid)
  state = checkpoints.new_state(model, trainer.tx)
  source = {"checkpoint": os.path.abspath(checkpoint), "args": os.path.abspath(args_path),
            **{f"original_{k}": v for k, v in info.items()}}
  plateau = Plateau(config.train.lr_patience, config.train.lr_factor, config.train.max_reduce)
  meta = checkpoints.run_meta(0, 0, plateau, run=trainer.run_info)
  meta["imported_from"] = source
  os.makedirs(workdir, exist_ok=True)
  latest, best = checkpoints.checkpoint_managers(workdir)
  for manager in (latest, best):
    checkpoints.save(manager, state, meta)
    manager.wait_until_finished()
    manager.close()
  config_path = os.path.join(workdir, CONFIG_FILE)
  write_config_file(config_path, overrides, os.path.abspath(checkpoint))
  used = set(ARGS_TO_CONFIG) | set(IMPORTABLE) | set(STACKED2D_ARGS) | {"mouse_ids"}
  ignored_args = sorted(set(args) - used)
  report = {**report, **source, "mice": names, "config": config_path,
            "args_ignored": ignored_args}
  if args.get("criterion", "poisson") != "poisson":
    report["note"] = (f"the run was trained with --criterion {args['criterion']}; training on "
                      "from this checkpoint uses the Poisson loss")
  with open(os.path.join(workdir, REPORT_FILE), "w") as f:
    json.dump(report, f, indent=1, default=str)
  return report


def restore_model(workdir: str):
  """(model, run info) of a run directory's best checkpoint, built from its recorded config."""
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx

  from v1t_jax import checkpoints
  from v1t_jax.model import ModelConfig, abstract_model

  manager = ocp.CheckpointManager(checkpoints.run_path(workdir) / "best")
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint in {workdir}/best")
  run = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta["run"]
  abstract = abstract_model(ModelConfig.from_config(run["config"]["model"]),
                                  [m["neurons"] for m in run["mice"]], run["image_hwc"])
  target = jax.eval_shape(
      lambda: checkpoints.new_state(abstract, checkpoints.make_optimizer_for_restore()))
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target))).state
  manager.close()
  graphdef = checkpoints.split_model(abstract)[0]
  return nnx.merge(graphdef, state["params"], state["buffers"]), run


def export_checkpoint(workdir: str, output: str, *, old_naming: bool = False) -> dict:
  """A run directory's best checkpoint -> the original's state_dict file (.npz or .pt)."""
  model, run = restore_model(workdir)
  names = [m["name"] for m in run["mice"]]
  ids = [old_mouse_id(m["name"], m["data_key"]) for m in run["mice"]] if old_naming else names
  raw_hw = run["mice"][0]["image_shape"][1:3]   # [C, H, W] of the data
  state_dict = export_state_dict(model, ids, old_naming=old_naming, raw_image_hw=raw_hw,
                                 center_crop=run["config"]["data"]["center_crop"])
  save_state_dict_file(state_dict, output)
  return {"output": os.path.abspath(output), "mouse_ids": ids, "keys": len(state_dict)}


def define_flags():
  """The command's flags; defined only when run as a script, since other modules of the
  project (data_prep.convert) define flags of the same names."""
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "the original's model_state.pt (or a .npz / "
                      ".safetensors state_dict); with --export, the file to write", required=True)
  flags.DEFINE_string("args", None, "the run's args.yaml (default: RUN/args.yaml for "
                      "RUN/ckpt/model_state.pt)")
  flags.DEFINE_string("data_dir", None, "converted data holding the run's mice")
  flags.DEFINE_string("workdir", None, "run directory to write (import) or read (--export)",
                      required=True)
  flags.DEFINE_bool("trust_pickle", False,
                    "let torch.load unpickle arbitrary objects (trusted files only); the "
                    "original's own checkpoints load without it (torch >= 2.4)")
  flags.DEFINE_bool("skip_source_grid_check", False, "load readouts even if their source grids "
                    "disagree with the data's cell coordinates")
  flags.DEFINE_bool("export", False, "write the workdir's best checkpoint to --checkpoint")
  flags.DEFINE_bool("old_naming", False, "--export: the older key naming (b-mlp.model, mice 0-6)")


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if f.export:
    result = export_checkpoint(f.workdir, f.checkpoint, old_naming=f.old_naming)
  else:
    if not f.data_dir:
      raise app.UsageError("--data_dir is required to import")
    result = import_checkpoint(f.checkpoint, f.args, f.data_dir, f.workdir,
                               trust_pickle=f.trust_pickle,
                               check_source_grid=not f.skip_source_grid_check)
    print(f"imported {result['keys_loaded']} tensors for mice {result['mice']} into "
          f"{f.workdir}; evaluate with:\n  python launch_train.py --config={result['config']} "
          f"--workdir={f.workdir} --mode=evaluate", flush=True)
  print(json.dumps(result, default=str))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # TensorFlow is imported later (data)
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  from absl import app, logging
  define_flags()
  logging.set_verbosity(logging.WARNING)   # orbax logs every file at INFO
  app.run(main)
