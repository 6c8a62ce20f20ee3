"""Generic layers shared by the model's parts: PyTorch-initialised linears, LayerNorm, dropout,
drop path, buffers, and per-mouse module stacks.

Precision: with `compute_dtype` bfloat16 a linear casts its operands (activations and kernel) to
bf16 and accumulates in float32 (`preferred_element_type`); parameters stay float32.
Randomness is explicit: a layer takes a PRNG `key`, or None for a deterministic pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Initializer = Callable[..., jax.Array]

LAYER_NORM_EPS = 1e-5  # PyTorch's default; Flax's is 1e-6 (model_spec.md §14.1)
TRANSFORMER_INIT_STD = 0.02  # trunc_normal_(std=.02, a=-2, b=2): bounds at ±100σ = plain normal
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DROPOUT_MASK = "dropout_mask"  # checkpoint name of every dropout keep-mask (remat policies)


class Buffer(nnx.Variable):
  """Non-trainable state, like the original's registered buffers (e.g. a readout's source_grid)."""


def symmetric_uniform(bound: float) -> Initializer:
  """U(-bound, bound): PyTorch's default Linear/Conv init when bound = 1/sqrt(fan_in)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


@functools.cache
def matmul_promote(compute_dtype: str) -> Callable:
  """A Flax `promote_dtype` that casts (inputs, kernel) to compute_dtype and leaves the bias f32.

  Cached so every layer of one dtype shares one function object (graphdefs stay comparable).
  """
  target = COMPUTE_DTYPES[compute_dtype]

  def promote(args, /, *, dtype=None, inexact=True):
    del dtype, inexact  # the layer's own dtype is unused: target decides
    inputs, kernel, *rest = args
    return (inputs.astype(target), kernel.astype(target), *rest)

  return promote


def linear(
    in_features: int,
    out_features: int,
    *,
    kernel_init: Initializer,
    bias_init: Initializer = jax.nn.initializers.zeros,
    use_bias: bool = True,
    compute_dtype: str = "float32",
    rngs: nnx.Rngs,
) -> nnx.Linear:
  """nnx.Linear with float32 params, compute_dtype operands and float32 accumulation."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, kernel_init=kernel_init,
      bias_init=bias_init, promote_dtype=matmul_promote(compute_dtype),
      preferred_element_type=jnp.float32, rngs=rngs)


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
  """Linear with PyTorch's default init: weight and bias U(±1/sqrt(fan_in)) (float32 only)."""
  init = symmetric_uniform(in_features**-0.5)
  return linear(in_features, out_features, kernel_init=init, bias_init=init, rngs=rngs)


def transformer_linear(
    in_features: int, out_features: int, *, use_bias: bool, compute_dtype: str, rngs: nnx.Rngs
) -> nnx.Linear:
  """Linear with the original Transformer's init: weight N(0, 0.02²), bias 0 (§3.4)."""
  return linear(
      in_features, out_features, kernel_init=jax.nn.initializers.normal(TRANSFORMER_INIT_STD),
      use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)


def layer_norm(num_features: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """PyTorch-style LayerNorm: eps 1e-5, scale 1, bias 0, two-pass variance."""
  return nnx.LayerNorm(num_features, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


def split_key(key: jax.Array | None, num: int) -> list[jax.Array | None]:
  """`num` independent keys, or `num` Nones for a deterministic pass."""
  if key is None:
    return [None] * num
  return list(jax.random.split(key, num))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout (torch.nn.Dropout): an independent keep decision per element, kept values
  scaled by 1 / (1 - rate); identity when key is None or rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = checkpoint_name(jax.random.bernoulli(key, 1.0 - rate, x.shape), DROPOUT_MASK)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: zero whole samples (leading axis) with probability rate, rescale the rest."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def stack_per_mouse(make: Callable[..., nnx.Module], num_mice: int, rngs: nnx.Rngs, *per_mouse):
  """Build `num_mice` independently initialised copies of make(*args, rngs=...) as one module.

  Every Variable gets a leading mouse axis; `per_mouse` arrays are sliced along their axis 0.
  """

  @nnx.split_rngs(splits=num_mice)
  @nnx.vmap(in_axes=(0,) + (0,) * len(per_mouse), out_axes=0, axis_size=num_mice)
  def build(rngs, *args):
    return make(*args, rngs=rngs)

  return build(rngs, *per_mouse)


def apply_per_mouse(module: nnx.Module, *args):
  """Call a stacked module on [M, ...] arguments, mouse m's slice with mouse m's parameters.

  Split + jax.vmap + merge rather than nnx.vmap: the call is read-only, and this stays valid when
  the parameters and the buffers are traced at different levels (jax.grad over the Params of a
  re-merged model), where nnx.vmap refuses to extract the graph.
  """
  graphdef, state = nnx.split(module)
  return jax.vmap(lambda state, *a: nnx.merge(graphdef, state)(*a))(state, *args)
