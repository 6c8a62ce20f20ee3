"""The V1T model (model_spec.md §1): shared ViT core, per-mouse shifters and readouts, ELU+1.

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

from v1t_jax import image_stage, layers, readout, shifter, vit

# Behaviour features the B-MLP sees per behavior_mode (0: none, 1: image channels, no B-MLP).
BEHAVIOR_DIMS = {0: 0, 1: 0, 2: 3, 3: 5, 4: 5}
NUM_BEHAVIOR = 3  # [dilation, d dilation / dt, running speed]

# The one place where named modes are checked: field -> allowed values.
ALLOWED = {
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
  """Model hyper-parameters; names and defaults follow the original's flags (model_spec.md §12)."""

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

  def __post_init__(self):
    for name, allowed in ALLOWED.items():
      value = getattr(self, name)
      if (name, value) in NOT_PORTED:
        raise ValueError(f"{name}={value!r}: {NOT_PORTED[name, value]}; allowed: {allowed}")
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

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


class V1T(nnx.Module):
  """Shared ViT core + per-mouse core shifters and Gaussian2d readouts, output ELU(y) + 1."""

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
    self.core = vit.ViTCore(
        (height, width, channels),
        patch_size=config.patch_size, patch_stride=config.patch_stride,
        patch_mode=config.patch_mode, emb_dim=config.emb_dim, num_heads=config.num_heads,
        num_blocks=config.num_blocks, mlp_dim=config.mlp_dim, p_dropout=config.p_dropout,
        t_dropout=config.t_dropout, drop_path=config.drop_path, use_lsa=config.use_lsa,
        disable_bias=config.disable_bias, behavior_dim=config.behavior_dim,
        bmlp_mice=num_mice if config.behavior_mode == 4 else None,
        attention=config.attention, compute_dtype=config.compute_dtype, remat=remat, rngs=rngs)
    self.shifters = shifter.make_shifters(num_mice, rngs=rngs) if config.shift_mode == 2 else None
    self.readouts = readout.make_readouts(
        neuron_counts=self.neuron_counts, coordinates=np.asarray(coordinates),
        bias_MxN=readout.initial_bias(
            config.bias_mode, self.neuron_counts, response_mean, response_std),
        num_channels=config.emb_dim, disable_grid_predictor=config.disable_grid_predictor,
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
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Predicted standardised responses.

    Args:
      train: dropout, drop path and readout position sampling on; needs `key`.
      key: PRNG key for the training randomness (ignored when train is False).
      return_attention: also return the attention probabilities (forces the reference path).

    Returns:
      (pred [M, B, N_max] > 0; padded neurons hold arbitrary finite values, mask them,
       aux: "pre_activation" [M, B, N_max], "shift" [M, B, 2] (with a shifter),
            "attention" [M, B, L, H, T, T] (with return_attention)).
    """
    if train and key is None:
      raise ValueError("train=True needs a PRNG key")
    core_key, readout_key = layers.split_key(key if train else None, 2)
    mice = image_MxBxHxWxC.shape[0]
    if self.config.behavior_mode == 1:  # after the resize, as in the original
      image_MxBxHxWxC = tile_behavior(image_MxBxHxWxC, behavior_MxBx3)
    behavior = None
    if self.config.behavior_dim:
      behavior = self.behavior_features(behavior_MxBx3, pupil_center_MxBx2)
    feat, attention = self.core(
        image_MxBxHxWxC, behavior, key=core_key, return_attention=return_attention)
    aux = {}
    shift_MxBx2 = None
    if self.shifters is not None:
      shift_MxBx2 = layers.apply_per_mouse(self.shifters, pupil_center_MxBx2)
      aux["shift"] = shift_MxBx2
    readout_keys = None if readout_key is None else jax.random.split(readout_key, mice)
    y_MxBxN = layers.apply_per_mouse(self.readouts, feat, shift_MxBx2, readout_keys)
    aux["pre_activation"] = y_MxBxN
    if attention is not None:
      aux["attention"] = attention
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
