"""The V1T model (model_spec.md §1): a shared core, per-mouse shifters and readouts, ELU+1.

The core is the ViT (`model.core="vit"`, vit.py) or the original's CNN baseline
(`"stacked2d"`, stacked2d.py), chosen in `build_core` and nowhere else.

A batch has a leading mouse axis: image [M, B, H, W, C] (channels-last, already cropped and
resized by the pipeline), behavior [M, B, 3], pupil_center [M, B, 2]. The core runs once on the
merged [M*B] axis; the per-mouse modules are stacked on a leading mouse axis and vmapped over M.
Data-derived tables (neuron counts, coordinates, response statistics) are constructor arguments,
never config fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v1t_jax import image_stage, layers, readout, shifter, stacked2d, vit

# Behaviour features the B-MLP sees per behavior_mode (0: none, 1: image channels, no B-MLP).
BEHAVIOR_DIMS = {0: 0, 1: 0, 2: 3, 3: 5, 4: 5}
NUM_BEHAVIOR = 3  # [dilation, d dilation / dt, running speed]

# The one place where named modes are checked: field -> allowed values.
ALLOWED = {
    "core": ("vit", "stacked2d"),
    "behavior_mode": tuple(BEHAVIOR_DIMS),
    "shift_mode": (0, 2),
    "patch_mode": (0, 1),
    "bias_mode": (0, 1, 2),
    "grid_predictor_dim": (2, 3),
    "compute_dtype": tuple(layers.COMPUTE_DTYPES),
    "attention": ("explicit", "fused"),
}
# Values of the original that are deliberately not ported, with the reason given to the user.
NOT_PORTED = {
    ("shift_mode", 1): "the image shifter (shift_mode 1/3/4) is out of scope",
    ("shift_mode", 3): "the image shifter (shift_mode 1/3/4) is out of scope",
    ("shift_mode", 4): "the image shifter (shift_mode 1/3/4) is out of scope",
    ("patch_mode", 2): "shifted patch tokenization (patch_mode 2) is not ported",
    ("patch_mode", 3): "dual PatchNorm (patch_mode 3) is not ported",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyper-parameters; names and defaults follow the original's flags (model_spec.md §12).

  The ViT core's fields are this section's own (the default core); another core has its own
  section (e.g. `stacked2d`), used only when `core` names it.
  """

  core: str = "vit"
  patch_size: int = 8
  patch_stride: int = 1
  patch_mode: int = 0  # 0 unfold + linear, 1 conv
  emb_dim: int = 155  # D, also the width of every attention head
  num_heads: int = 4
  num_blocks: int = 4
  mlp_dim: int = 488
  p_dropout: float = 0.0229  # after patch + positional embedding
  t_dropout: float = 0.2544  # attention probabilities, attention output, MLP
  drop_path: float = 0.0
  use_lsa: bool = False
  disable_bias: bool = False
  behavior_mode: int = 3  # 0 none, 1 image channels, 2/3 shared B-MLP (3 / 5 inputs), 4 per mouse
  shift_mode: int = 2  # 0 no shifter, 2 per-mouse core shifter
  disable_grid_predictor: bool = False
  grid_predictor_dim: int = 2
  bias_mode: int = 0  # 0 zeros, 1 mean response, 2 mean / std
  init_sigma: float = 0.1
  init_mu_range: float = 0.3
  core_reg_scale: float = 0.5379
  readout_reg_scale: float = 0.0076
  shifter_reg_scale: float = 0.0
  ds_scale: bool = True
  compute_dtype: str = "float32"  # or "bfloat16": bf16 matmul operands, f32 accumulation
  # "fused": flash attention (vit.Attention._fused); the explicit path runs when attention
  # probabilities are requested.
  attention: str = "explicit"
  stacked2d: stacked2d.Stacked2dConfig = dataclasses.field(
      default_factory=stacked2d.Stacked2dConfig)

  def __post_init__(self):
    if not isinstance(self.stacked2d, stacked2d.Stacked2dConfig):   # a dict or ConfigDict
      object.__setattr__(self, "stacked2d", stacked2d.Stacked2dConfig.from_config(self.stacked2d))
    for name, allowed in ALLOWED.items():
      value = getattr(self, name)
      if (name, value) in NOT_PORTED:
        raise ValueError(f"{name}={value!r}: {NOT_PORTED[name, value]}; allowed: {allowed}")
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if self.core == "stacked2d" and self.behavior_mode not in (0, 1):
      # As the original: its CNN core has no B-MLP (behaviour can enter as image channels).
      raise ValueError(f"core='stacked2d' takes behavior_mode 0 or 1, got {self.behavior_mode}")

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> ModelConfig:
    """From `config.model` (a ConfigDict or a dict); unknown keys are an error."""
    values = dict(config.items())
    if values.get("attention") == "reference":  # the explicit path's name before session 8
      values["attention"] = "explicit"
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown model config fields: {unknown}")
    return cls(**values)

  @property
  def behavior_dim(self) -> int:
    """B-MLP input width (0 = no B-MLP)."""
    return BEHAVIOR_DIMS[self.behavior_mode]


def crop_resize(
    images_NxHxWxC: jax.Array,
    *,
    center_crop: float = 1.0,
    out_hw: Sequence[int] | None = (36, 64),
) -> jax.Array:
  """The original's image stage (center crop, bilinear resize, no antialias) on [..., H, W, C].

  For users with full-resolution images; the input pipeline applies the same matrices itself.
  For 144x256 -> 36x64 this is exactly the 2x2 block mean of model_spec.md §2.4.
  """
  a_y, a_x = image_stage.crop_resize_matrices(
      images_NxHxWxC.shape[-3:-1], center_crop, None if out_hw is None else tuple(out_hw))
  return jnp.einsum("ih,...hwc,jw->...ijc", a_y, images_NxHxWxC, a_x,
                    precision=jax.lax.Precision.HIGHEST)


def tile_behavior(image_MxBxHxWxC: jax.Array, behavior_MxBx3: jax.Array) -> jax.Array:
  """behavior_mode 1: the 3 behaviour values as constant extra channels after the image's own."""
  tiles = jnp.broadcast_to(behavior_MxBx3[:, :, None, None, :],
                           image_MxBxHxWxC.shape[:4] + behavior_MxBx3.shape[-1:])
  return jnp.concatenate([image_MxBxHxWxC, tiles], axis=-1)


def build_core(config: ModelConfig, image_shape: Sequence[int], *, num_mice: int, remat: str,
               rngs: nnx.Rngs) -> nnx.Module:
  """The core that `config.core` names: the one place where a core is chosen.

  A core is one module file: a constructor from its config section, `output_shape` (h, w, c),
  `regularizer()` (its weighted term of §7), and `__call__(images [M, B, H, W, C], behavior
  [M, B, F] or None, *, train, key)` -> (feature map [M, B, h, w, c], extras dict). A third
  core is that file, its name in ALLOWED["core"] and one branch here.
  """
  if config.core == "stacked2d":
    return stacked2d.Stacked2dCore(config.stacked2d, tuple(image_shape),
                                   compute_dtype=config.compute_dtype, rngs=rngs)
  return vit.ViTCore.from_config(config, image_shape, num_mice=num_mice, remat=remat, rngs=rngs)


class V1T(nnx.Module):
  """Shared core + per-mouse core shifters and Gaussian2d readouts, output ELU(y) + 1."""

  def __init__(
      self,
      config: ModelConfig,
      *,
      neuron_counts: Sequence[int],
      coordinates: np.ndarray,
      image_shape: Sequence[int] = (36, 64, 1),
      response_mean: np.ndarray | None = None,
      response_std: np.ndarray | None = None,
      remat: str = "none",
      rngs: nnx.Rngs,
  ):
    """Args:
      config: hyper-parameters.
      neuron_counts: real neurons per mouse; N_max = max(neuron_counts).
      coordinates: [M, N_max, 3] cortical coordinates in µm (rows past a count are ignored).
      image_shape: (H, W, C) of the pipeline's images (before behaviour channels of mode 1).
      response_mean, response_std: [M, N_max] statistics for bias_mode 1 / 2.
      remat: what the core's blocks keep for the backward pass (vit.REMAT_POLICIES; train.remat).
      rngs: parameter init randomness (`params` stream).
    """
    self.config = config
    self.neuron_counts = tuple(int(n) for n in neuron_counts)
    if not self.neuron_counts or min(self.neuron_counts) < 1:
      raise ValueError(f"neuron_counts must be positive, got {neuron_counts}")
    num_mice = len(self.neuron_counts)
    height, width, channels = image_shape
    if config.behavior_mode == 1:  # behaviour tiled as extra image channels
      channels += NUM_BEHAVIOR
    self.core = build_core(config, (height, width, channels), num_mice=num_mice, remat=remat,
                           rngs=rngs)
    self.shifters = shifter.make_shifters(num_mice, rngs=rngs) if config.shift_mode == 2 else None
    self.readouts = readout.make_readouts(
        neuron_counts=self.neuron_counts, coordinates=np.asarray(coordinates),
        bias_MxN=readout.initial_bias(
            config.bias_mode, self.neuron_counts, response_mean, response_std),
        num_channels=self.core.output_shape[-1], disable_grid_predictor=config.disable_grid_predictor,
        grid_predictor_dim=config.grid_predictor_dim, init_sigma=config.init_sigma,
        init_mu_range=config.init_mu_range, rngs=rngs)

  @property
  def neuron_mask(self) -> np.ndarray:
    """[M, N_max] bool, True for real neurons (a constant under jit)."""
    return readout.neuron_mask(self.neuron_counts)

  def behavior_features(self, behavior_MxBx3: jax.Array, pupil_MxBx2: jax.Array) -> jax.Array:
    """B-MLP input: behaviour (mode 2) or behaviour ++ pupil centre (modes 3, 4)."""
    if self.config.behavior_dim == NUM_BEHAVIOR:
      return behavior_MxBx3
    return jnp.concatenate([behavior_MxBx3, pupil_MxBx2], axis=-1)

  def __call__(
      self,
      image_MxBxHxWxC: jax.Array,
      behavior_MxBx3: jax.Array,
      pupil_center_MxBx2: jax.Array,
      *,
      train: bool,
      key: jax.Array | None = None,
      return_attention: bool = False,
      valid_MxB: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Predicted standardised responses.

    Args:
      train: dropout, drop path and readout position sampling on; needs `key`.
      key: PRNG key for the training randomness (ignored when train is False).
      valid_MxB: real rows of a padded batch, for cores with batch statistics (BatchNorm).
      return_attention: also return the attention probabilities (a core with attention maps).

    Returns:
      (pred [M, B, N_max] > 0; padded neurons hold arbitrary finite values, mask them,
       aux: "pre_activation" [M, B, N_max], "shift" [M, B, 2] (with a shifter),
            "attention" [M, B, L, H, T, T] (with return_attention)).
    """
    if train and key is None:
      raise ValueError("train=True needs a PRNG key")
    mice = image_MxBxHxWxC.shape[0]
    core_key = readout_keys = None
    if train:   # one split for the core and every mouse's readout
      keys = jax.random.split(key, 1 + mice)
      core_key, readout_keys = keys[0], keys[1:]
    if self.config.behavior_mode == 1:  # after the resize, as in the original
      image_MxBxHxWxC = tile_behavior(image_MxBxHxWxC, behavior_MxBx3)
    behavior = None
    if self.config.behavior_dim:
      behavior = self.behavior_features(behavior_MxBx3, pupil_center_MxBx2)
    extra_args = {}
    if return_attention:
      if not getattr(self.core, "has_attention", False):
        raise ValueError(f"the {self.config.core} core has no attention maps")
      extra_args["return_attention"] = True
    if valid_MxB is not None and getattr(self.core, "takes_valid", False):
      extra_args["valid_MxB"] = valid_MxB
    feat, aux = self.core(image_MxBxHxWxC, behavior, train=train, key=core_key, **extra_args)
    aux = dict(aux)
    shift_MxBx2 = None
    if self.shifters is not None:
      shift_MxBx2 = layers.apply_per_mouse(self.shifters, pupil_center_MxBx2)
      aux["shift"] = shift_MxBx2
    y_MxBxN = layers.apply_per_mouse(self.readouts, feat, shift_MxBx2, readout_keys)
    aux["pre_activation"] = y_MxBxN
    return jax.nn.elu(y_MxBxN) + 1.0, aux


def count_parameters(model: V1T) -> dict[str, int]:
  """Trainable parameters by part, counting only real neurons (padding is not a parameter)."""

  def size(module):
    if module is None:
      return 0
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

  counts = {
      "core": size(model.core),
      "readouts": readout.count_parameters(model.readouts, model.neuron_counts),
      "shifters": size(model.shifters),
  }
  counts["total"] = sum(counts.values())
  return counts


# ---------------------------------------------------------------------------------------------
# The one place that builds a model from a run's config and data (training, import, prediction).


def padded(rows: Sequence[np.ndarray], n_max: int, width: int | None = None) -> np.ndarray:
  """Stack per-mouse arrays of different lengths, zero-padded to n_max rows."""
  shape = (len(rows), n_max) + (() if width is None else (width,))
  out = np.zeros(shape, np.float32)
  for m, r in enumerate(rows):
    out[m, : len(r)] = r
  return out


def model_config(config) -> ModelConfig:
  """ModelConfig of a run's config (config.model, with the effect of train.pretrain_core)."""
  values = dict(config.model.items())
  if config.train.pretrain_core:   # a frozen core contributes nothing to the regulariser (§7)
    values["core_reg_scale"] = 0.0
    if "stacked2d" in values:
      values["stacked2d"] = dict(values["stacked2d"], core_reg_input=0.0, core_reg_hidden=0.0)
  return ModelConfig.from_config(values)


def build_model(config, mice: Sequence[Any], image_hwc, seed) -> V1T:
  """The model of a run: `mice` are dataset_meta.MouseMeta (neurons, coordinates, statistics);
  `seed` an int, or a traced int32 (one compiled init for every seed)."""
  counts = [m.num_neurons for m in mice]
  n_max = max(counts)
  return V1T(
      model_config(config), neuron_counts=counts,
      coordinates=padded([m.coordinates for m in mice], n_max, 3),
      image_shape=tuple(image_hwc),
      response_mean=padded([m.stat("responses", "mean") for m in mice], n_max),
      response_std=padded([m.stat("responses", "std") for m in mice], n_max),
      remat=config.train.get("remat", "none"), rngs=nnx.Rngs(params=jax.random.key(seed)))


def abstract_model(model_cfg: ModelConfig, counts: Sequence[int], image_hwc) -> V1T:
  """A V1T of these mice with shapes only, to restore a checkpoint into (the coordinates and
  the bias statistics are placeholders: their values come from the checkpoint)."""
  n_max = max(counts)
  placeholder = np.ones((len(counts), n_max), np.float32)
  return nnx.eval_shape(lambda: V1T(
      model_cfg, neuron_counts=counts, coordinates=np.zeros((len(counts), n_max, 3), np.float32),
      image_shape=tuple(image_hwc), response_mean=placeholder, response_std=placeholder,
      rngs=nnx.Rngs(0)))
