"""The original's CNN core, `--core stacked2d`: V1T src/v1t/models/core/stacked2d.py
(`Stacked2dCore`, adapted there from neuralpredictors' layers/cores/conv2d.py), channels-last.

V1T's own defaults, not neuralpredictors': 4 layers of 64 channels, a 9x9 VALID input conv
without bias, depth-separable 7x7 hidden convs (1x1 -> depthwise 7x7 'same' -> 1x1, all with
bias), BatchNorm2d (momentum 0.9 in PyTorch's convention, eps 1e-5) and ELU after every conv,
only the last layer's output, regulariser core_reg_input * LaplaceL2norm (summed, padding 1) of
the first kernel; group sparsity is skipped for depth-separable convs. Behaviour is never an
input of the core (behavior_mode 1 adds it as image channels before the core).
Precision: conv operands in compute_dtype with float32 accumulation; BatchNorm, ELU float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from v1t_jax import layers

BEHAVIOR_MODES = (0, 1)  # the original refuses the others (stacked2d.py:353)
BN_EPS = 1e-5  # nn.BatchNorm2d's default; the original passes only momentum
XAVIER_NORMAL = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")  # not truncated


@dataclasses.dataclass(frozen=True)
class Stacked2dConfig:
  """Flags of train.py (first five) and Stacked2dCore.__init__ arguments, V1T's defaults."""

  num_layers: int = 4  # --num_layers
  dropout: float = 0.0  # --dropout: Dropout2d after every hidden layer but the last
  core_reg_input: float = 6.3831  # --core_reg_input: gamma_input (Laplace)
  core_reg_hidden: float = 0.0  # --core_reg_hidden: gamma_hidden (group sparsity)
  linear: bool = False  # --linear: no ELU anywhere
  hidden_channels: int = 64
  input_kern: int = 9
  hidden_kern: int | tuple[int, ...] = 7
  skip: int = 0  # > 1: layer l sees the concatenated outputs of the last min(skip, l) layers
  stride: int = 1  # hidden convs only
  final_nonlinearity: bool = True
  elu_shift: tuple[float, float] = (0.0, 0.0)  # ELU(x - xshift) + yshift
  bias: bool = True
  momentum: float = 0.9  # PyTorch convention: running = (1 - m) * running + m * batch
  pad_input: bool = False
  hidden_padding: int | None = None  # None: ((hidden_kern[0] - 1) * dilation + 1) // 2
  batch_norm: bool = True
  hidden_dilation: int = 1
  laplace_padding: int | None = None  # None: 3 // 2 = 1
  stack: int | tuple[int, ...] | None = -1  # int s: layers[s:]; None: all; tuple: these
  use_avg_reg: bool = False  # LaplaceL2norm with mean instead of sum
  depth_separable: bool = True

  def __post_init__(self):
    for name in ("hidden_kern", "stack", "elu_shift"):  # lists from YAML/JSON -> tuples
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
    if isinstance(self.hidden_kern, tuple) and len(self.hidden_kern) != self.num_layers - 1:
      raise ValueError(f"hidden_kern needs {self.num_layers - 1} sizes, got {self.hidden_kern}")
    if not self.stacked_layers:
      raise ValueError(f"stack={self.stack!r} selects no layer")

  @classmethod
  def from_config(cls, mapping: Mapping[str, Any]) -> Stacked2dConfig:
    """From a dict or ConfigDict; unknown keys are an error."""
    values = dict(mapping.items())
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown stacked2d config fields: {unknown}")
    return cls(**values)

  @property
  def hidden_kerns(self) -> tuple[int, ...]:
    kern = self.hidden_kern
    return kern if isinstance(kern, tuple) else (kern,) * (self.num_layers - 1)

  @property
  def hidden_pad(self) -> int:
    """One padding for all hidden layers, from the FIRST hidden kernel (as the original)."""
    if self.hidden_padding is not None or self.num_layers == 1:
      return self.hidden_padding or 0
    return ((self.hidden_kerns[0] - 1) * self.hidden_dilation + 1) // 2

  @property
  def stacked_layers(self) -> tuple[int, ...]:
    """Indices of the layers concatenated (in this order) into the output."""
    every = tuple(range(self.num_layers))
    if self.stack is None:
      return every
    return every[self.stack:] if isinstance(self.stack, int) else tuple(self.stack)


class BatchNorm(nnx.Module):
  """nn.BatchNorm2d on [M, B, H, W, C]: mouse m's batch uses its own statistics (the original
  runs the core once per mouse) and the running stats are updated M times, mouse 0 first."""

  def __init__(self, num_features: int, *, momentum: float, eps: float = BN_EPS):
    self.momentum, self.eps = momentum, eps
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x_MxBxHxWxC: jax.Array, *, train: bool,
               valid_MxB: jax.Array | None = None) -> jax.Array:
    """valid_MxB: training statistics over the valid rows only (a partial batch's padding)."""
    x_MxBxHxWxC = x_MxBxHxWxC.astype(jnp.float32)
    if train:
      mice, batch, height, width, _ = x_MxBxHxWxC.shape
      if batch * height * width < 2:
        raise ValueError("BatchNorm in training needs more than 1 value per channel")
      rows = jnp.ones((mice, batch)) if valid_MxB is None else valid_MxB.astype(jnp.float32)
      w = rows[:, :, None, None, None]
      count = jnp.maximum(w.sum(axis=1, keepdims=True) * height * width, 2.0)   # [M, 1, 1, 1, 1]
      mean_Mx1x1x1xC = (x_MxBxHxWxC * w).sum(axis=(1, 2, 3), keepdims=True) / count
      var_Mx1x1x1xC = (jnp.square(x_MxBxHxWxC - mean_Mx1x1x1xC) * w).sum(
          axis=(1, 2, 3), keepdims=True) / count
      # M sequential updates r <- (1 - m) r + m s_k in closed form; var uses the unbiased s_k.
      decay = 1.0 - self.momentum
      weights_M = self.momentum * decay ** jnp.arange(mice - 1, -1, -1, dtype=jnp.float32)
      count = count.reshape(mice, 1)
      unbiased_MxC = var_Mx1x1x1xC.reshape(mice, -1) * (count / (count - 1))
      mean_MxC = mean_Mx1x1x1xC.reshape(mice, -1)  # elementwise sums: no TF32 matmul on GPU
      self.mean[...] = decay**mice * self.mean[...] + (weights_M[:, None] * mean_MxC).sum(0)
      self.var[...] = decay**mice * self.var[...] + (weights_M[:, None] * unbiased_MxC).sum(0)
    else:
      mean_Mx1x1x1xC, var_Mx1x1x1xC = self.mean[...], self.var[...]
    normed = (x_MxBxHxWxC - mean_Mx1x1x1xC) * jax.lax.rsqrt(var_Mx1x1x1xC + self.eps)
    return normed * self.scale[...] + self.bias[...]


def conv2d(in_ch: int, out_ch: int, kern: int, *, padding: int, use_bias: bool,
           compute_dtype: str, rngs: nnx.Rngs, stride: int = 1, dilation: int = 1,
           groups: int = 1) -> nnx.Conv:
  """nn.Conv2d (symmetric zero padding) with the original's init: xavier_normal_, bias 0."""
  return nnx.Conv(
      in_ch, out_ch, (kern, kern), strides=stride, padding=((padding, padding),) * 2,
      kernel_dilation=dilation, feature_group_count=groups, use_bias=use_bias,
      kernel_init=XAVIER_NORMAL, bias_init=jax.nn.initializers.zeros,
      promote_dtype=layers.matmul_promote(compute_dtype), preferred_element_type=jnp.float32,
      rngs=rngs)


class DepthSeparableConv(nnx.Module):
  """The original's DepthSeparableConv2d: 1x1 conv, depthwise kxk conv, 1x1 conv."""

  def __init__(self, in_ch: int, out_ch: int, kern: int, *, stride: int, padding: int,
               dilation: int, use_bias: bool, compute_dtype: str, rngs: nnx.Rngs):
    common = {"use_bias": use_bias, "compute_dtype": compute_dtype, "rngs": rngs}
    self.in_depth_conv = conv2d(in_ch, out_ch, 1, padding=0, **common)
    self.spatial_conv = conv2d(out_ch, out_ch, kern, padding=padding, stride=stride,
                               dilation=dilation, groups=out_ch, **common)
    self.out_depth_conv = conv2d(out_ch, out_ch, 1, padding=0, **common)

  def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
    return self.out_depth_conv(self.spatial_conv(self.in_depth_conv(x_NxHxWxC)))


class Layer(nnx.Module):
  """One `features.layer{l}`: conv (or ds_conv), BatchNorm, ELU, Dropout2d - each optional."""

  def __init__(self, conv: nnx.Module, conv_name: str, channels: int, *, config: Stacked2dConfig,
               nonlinear: bool, dropout: float):
    self.conv_name, self.nonlinear, self.dropout = conv_name, nonlinear, dropout
    self.elu_shift = tuple(config.elu_shift)
    setattr(self, conv_name, conv)
    self.norm = BatchNorm(channels, momentum=config.momentum) if config.batch_norm else None

  def __call__(self, x_MxBxHxWxC: jax.Array, *, train: bool, key: jax.Array | None,
               valid_MxB: jax.Array | None = None):
    mice, batch = x_MxBxHxWxC.shape[:2]
    y_NxHxWxC = getattr(self, self.conv_name)(x_MxBxHxWxC.reshape((-1,) + x_MxBxHxWxC.shape[2:]))
    y_MxBxHxWxC = y_NxHxWxC.reshape((mice, batch) + y_NxHxWxC.shape[1:])
    if self.norm is not None:
      y_MxBxHxWxC = self.norm(y_MxBxHxWxC, train=train, valid_MxB=valid_MxB)
    if self.nonlinear:
      x_shift, y_shift = self.elu_shift
      y_MxBxHxWxC = jax.nn.elu(y_MxBxHxWxC - x_shift) + y_shift
    if key is None or self.dropout == 0.0:
      return y_MxBxHxWxC
    # Dropout2d: one keep decision per (image, channel), kept channels scaled by 1 / (1 - p).
    keep = jax.random.bernoulli(key, 1.0 - self.dropout, (mice, batch, 1, 1, y_MxBxHxWxC.shape[-1]))
    return jnp.where(keep, y_MxBxHxWxC / (1.0 - self.dropout), 0.0)


class Stacked2dCore(nnx.Module):
  """The stacked2d core on [M, B, H, W, C] images -> ([M, B, h, w, c] features, {})."""
  takes_valid = True   # BatchNorm statistics over the valid rows of a partial batch

  def __init__(self, config: Stacked2dConfig, image_shape: tuple[int, int, int], *,
               compute_dtype: str = "float32", rngs: nnx.Rngs):
    cfg, num = config, config.num_layers
    self.config = config
    height, width, channels = image_shape
    conv_args = {"compute_dtype": compute_dtype, "rngs": rngs}
    pad0 = cfg.input_kern // 2 if cfg.pad_input else 0
    first = conv2d(channels, cfg.hidden_channels, cfg.input_kern, padding=pad0,
                   use_bias=cfg.bias and not cfg.batch_norm, **conv_args)
    nonlinear = [not cfg.linear and (l < num - 1 or cfg.final_nonlinearity) for l in range(num)]
    stack = [Layer(first, "conv", cfg.hidden_channels, config=cfg, nonlinear=nonlinear[0],
                   dropout=0.0)]
    hw = [(height + 2 * pad0 - cfg.input_kern + 1, width + 2 * pad0 - cfg.input_kern + 1)]
    for l, kern in enumerate(cfg.hidden_kerns, start=1):
      in_ch = cfg.hidden_channels * (min(cfg.skip, l) if cfg.skip > 1 else 1)
      hidden = {"padding": cfg.hidden_pad, "stride": cfg.stride, "use_bias": cfg.bias,
                "dilation": cfg.hidden_dilation, **conv_args}
      if cfg.depth_separable:
        conv, name = DepthSeparableConv(in_ch, cfg.hidden_channels, kern, **hidden), "ds_conv"
      else:
        conv, name = conv2d(in_ch, cfg.hidden_channels, kern, **hidden), "conv"
      stack.append(Layer(conv, name, cfg.hidden_channels, config=cfg, nonlinear=nonlinear[l],
                         dropout=cfg.dropout if l < num - 1 else 0.0))
      span = cfg.hidden_dilation * (kern - 1) + 1
      hw.append(tuple((n + 2 * cfg.hidden_pad - span) // cfg.stride + 1 for n in hw[-1]))
    self.layers = nnx.List(stack)
    sizes = {hw[l] for l in cfg.stacked_layers}
    if len(sizes) != 1 or min(min(hw)) < 1:
      raise ValueError(f"stacked layers {cfg.stacked_layers} have feature maps {hw}")
    # The true shape; the original's output_shape assumes pad_input=False and one stacked layer.
    self.output_shape = (*sizes.pop(), cfg.hidden_channels * len(cfg.stacked_layers))

  def __call__(self, images_MxBxHxWxC: jax.Array, behavior_MxBxF: jax.Array | None = None, *,
               train: bool, key: jax.Array | None = None,
               valid_MxB: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """train: batch statistics (of the valid_MxB rows), running stats updated in place; key:
    Dropout2d (None: off)."""
    if behavior_MxBxF is not None:
      raise ValueError(f"the stacked2d core takes no behaviour: behavior_mode must be one of "
                       f"{BEHAVIOR_MODES} (1: behaviour as image channels, added by the model)")
    skip, outputs = self.config.skip, []
    x_MxBxHxWxC = images_MxBxHxWxC
    keys = layers.split_key(key, len(self.layers))
    for l, (layer, layer_key) in enumerate(zip(self.layers, keys, strict=True)):
      if l >= 1 and skip > 1:
        x_MxBxHxWxC = jnp.concatenate(outputs[-min(skip, l):], axis=-1)
      x_MxBxHxWxC = layer(x_MxBxHxWxC, train=train, key=layer_key, valid_MxB=valid_MxB)
      outputs.append(x_MxBxHxWxC)
    return jnp.concatenate([outputs[l] for l in self.config.stacked_layers], axis=-1), {}

  def laplace(self) -> jax.Array:
    """LaplaceL2norm of the first kernel: agg(laplace(w)^2) / agg(w^2), agg sum (or mean)."""
    pad = 1 if self.config.laplace_padding is None else self.config.laplace_padding
    w_KxKxIxO = self.layers[0].conv.kernel[...].astype(jnp.float32)
    p = jnp.pad(w_KxKxIxO, ((pad, pad), (pad, pad), (0, 0), (0, 0)))
    # 3x3 filter [[0,-1,0],[-1,4,-1],[0,-1,0]] per (in, out) filter, exact shifted sums.
    lap = 4 * p[1:-1, 1:-1] - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]
    agg = jnp.mean if self.config.use_avg_reg else jnp.sum
    return agg(jnp.square(lap)) / agg(jnp.square(w_KxKxIxO))

  def group_sparsity(self) -> jax.Array:
    """Mean over (out, in) of each hidden kernel's L2 norm, averaged over the hidden layers;
    0 for depth-separable convs (the original skips them)."""
    if self.config.depth_separable or self.config.num_layers == 1:
      return jnp.zeros((), jnp.float32)
    norms = [jnp.sqrt(jnp.square(layer.conv.kernel[...]).sum(axis=(0, 1))).mean()
             for layer in self.layers[1:]]
    return sum(norms) / (self.config.num_layers - 1)

  def regularizer(self) -> jax.Array:
    """core_reg_hidden * group sparsity + core_reg_input * Laplace (stacked2d.py:580)."""
    return (self.config.core_reg_hidden * self.group_sparsity()
            + self.config.core_reg_input * self.laplace())


def torch_keys(config: Stacked2dConfig, prefix: str = "core") -> dict[str, tuple[tuple, str]]:
  """The original's state_dict keys -> (our path in nnx.state(core), kind); kind "conv":
  (O, I, kh, kw) -> HWIO, "same": as is, "skip": num_batches_tracked (not stored here)."""
  head = f"{prefix}.features" if prefix else "features"
  keys = {}

  def add_conv(torch_name, path, use_bias):
    keys[f"{torch_name}.weight"] = ((*path, "kernel"), "conv")
    if use_bias:
      keys[f"{torch_name}.bias"] = ((*path, "bias"), "same")

  for l in range(config.num_layers):
    base = f"{head}.layer{l}"
    if l == 0:
      add_conv(f"{base}.conv", ("layers", 0, "conv"), config.bias and not config.batch_norm)
    elif config.depth_separable:
      for sub in ("in_depth_conv", "spatial_conv", "out_depth_conv"):
        add_conv(f"{base}.ds_conv.{sub}", ("layers", l, "ds_conv", sub), config.bias)
    else:
      add_conv(f"{base}.conv", ("layers", l, "conv"), config.bias)
    if config.batch_norm:
      for torch_name, ours in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                               ("running_var", "var")):
        keys[f"{base}.norm.{torch_name}"] = (("layers", l, "norm", ours), "same")
      keys[f"{base}.norm.num_batches_tracked"] = ((), "skip")
  return keys
