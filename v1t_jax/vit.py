"""The ViT core of V1T (model_spec.md §3) and the small layer helpers the per-mouse modules share.

Layout: channels-last everywhere. The core sees the merged [M*B] axis of a [M, B, ...] batch, and
returns a [M, B, h, w, D] feature map. Randomness is explicit: every module takes `key`, a PRNG
key in training or None for a deterministic (evaluation) pass, so the model state holds no RNG
counters and the functional train step only threads parameters.

Precision: `compute_dtype` bfloat16 casts matmul operands (activations and kernels) to bf16 and
accumulates in float32 (`preferred_element_type`); parameters, the residual stream, softmax and
LayerNorm statistics stay float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

LAYER_NORM_EPS = 1e-5  # PyTorch's default; Flax's is 1e-6 (model_spec.md §14.1)
TRANSFORMER_INIT_STD = 0.02  # trunc_normal_(std=.02, a=-2, b=2): bounds at ±100σ = plain normal
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Buffer(nnx.Variable):
  """Non-trainable state, like the original's registered buffers (e.g. a readout's source_grid)."""


# ---------------------------------------------------------------------------------------------
# Initialisers, linear layers and randomness.


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
      in_features,
      out_features,
      use_bias=use_bias,
      kernel_init=kernel_init,
      bias_init=bias_init,
      promote_dtype=matmul_promote(compute_dtype),
      preferred_element_type=jnp.float32,
      rngs=rngs,
  )


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
  """Linear with PyTorch's default init: weight and bias U(±1/sqrt(fan_in)) (float32 only)."""
  init = symmetric_uniform(in_features**-0.5)
  return linear(in_features, out_features, kernel_init=init, bias_init=init, rngs=rngs)


def transformer_linear(
    in_features: int, out_features: int, *, use_bias: bool, compute_dtype: str, rngs: nnx.Rngs
) -> nnx.Linear:
  """Linear with the original Transformer's init: weight N(0, 0.02²), bias 0."""
  return linear(
      in_features,
      out_features,
      kernel_init=jax.nn.initializers.normal(TRANSFORMER_INIT_STD),
      use_bias=use_bias,
      compute_dtype=compute_dtype,
      rngs=rngs,
  )


def layer_norm(num_features: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """PyTorch-style LayerNorm: eps 1e-5, scale 1, bias 0, two-pass variance."""
  return nnx.LayerNorm(num_features, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


def split_key(key: jax.Array | None, num: int) -> list[jax.Array | None]:
  """`num` independent keys, or `num` Nones for a deterministic pass."""
  if key is None:
    return [None] * num
  return list(jax.random.split(key, num))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout (PyTorch semantics); identity when key is None or rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: zero whole samples (leading axis) with probability rate, rescale the rest."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0)


# ---------------------------------------------------------------------------------------------
# Per-mouse module stacks (readouts, shifters, mode-4 B-MLPs): one module with a leading mouse axis.


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


# ---------------------------------------------------------------------------------------------
# Patch geometry.


def patch_grid(image_hw: Sequence[int], patch_size: int, stride: int) -> tuple[int, int]:
  """(rows, cols) of VALID patches, e.g. (29, 57) for 36x64 with P=8, S=1."""
  rows, cols = ((n - patch_size) // stride + 1 for n in image_hw)
  if rows < 1 or cols < 1:
    raise ValueError(f"patch_size {patch_size} does not fit an image of {tuple(image_hw)}")
  return rows, cols


def find_shape(num_patches: int) -> tuple[int, int]:
  """The original's `find_shape`: (h, w) of the output map from the token count alone.

  h is the largest divisor of num_patches that is <= ceil(sqrt(num_patches)). It only factorises
  the count, so it can disagree with the true patch grid (P=8, S=4 on 36x64: grid 8x15, this
  gives 10x12 and the tokens are laid out scrambled). Reproduced for parity (model_spec.md §3.3).
  """
  h = math.ceil(math.sqrt(num_patches))
  while num_patches % h:
    h -= 1
  return h, num_patches // h


def unfold_patches(images_NxHxWxC: jax.Array, patch_size: int, stride: int) -> jax.Array:
  """torch `Unfold` on channels-last images: [N, rows*cols, C*P*P], tokens row-major.

  The patch vector is channel-major like the original: index c*P*P + ki*P + kj. So a Linear
  weight W (in, out) equals the VALID conv kernel K[ki, kj, c, d] = W[c*P*P + ki*P + kj, d]
  (HWIO; the PyTorch conv weight is W^T reshaped to (D, C, P, P)).
  """
  n, height, width, channels = images_NxHxWxC.shape
  rows, cols = patch_grid((height, width), patch_size, stride)
  shifted = [
      images_NxHxWxC[:, ki : ki + stride * (rows - 1) + 1 : stride,
                     kj : kj + stride * (cols - 1) + 1 : stride, :]
      for ki in range(patch_size)
      for kj in range(patch_size)
  ]
  patches_NxRxKxCxPP = jnp.stack(shifted, axis=-1)  # last axis = ki*P + kj
  return patches_NxRxKxCxPP.reshape(n, rows * cols, channels * patch_size * patch_size)


# ---------------------------------------------------------------------------------------------
# Modules.


class PatchEmbedding(nnx.Module):
  """Patches -> tokens, cls token prepended, learned positional embedding, dropout (§3.1)."""

  def __init__(
      self,
      image_shape: Sequence[int],
      *,
      patch_size: int,
      patch_stride: int,
      patch_mode: int,
      emb_dim: int,
      p_dropout: float,
      compute_dtype: str,
      rngs: nnx.Rngs,
  ):
    height, width, channels = image_shape
    rows, cols = patch_grid((height, width), patch_size, patch_stride)
    self.num_patches = rows * cols
    self.patch_size, self.patch_stride, self.patch_mode = patch_size, patch_stride, patch_mode
    self.p_dropout = p_dropout
    fan_in = channels * patch_size * patch_size
    torch_bound = symmetric_uniform(fan_in**-0.5)
    if patch_mode == 0:  # unfold + Linear, PyTorch default init (U(±1/8) by default)
      self.projection = linear(
          fan_in, emb_dim, kernel_init=torch_bound, bias_init=torch_bound,
          compute_dtype=compute_dtype, rngs=rngs)
    elif patch_mode == 1:
      # kaiming_normal_ (gain sqrt(2), fan_in, untruncated). The spec names only the weight
      # init, so the bias keeps PyTorch's Conv2d default U(±1/sqrt(fan_in)) (an assumption).
      self.projection = nnx.Conv(
          channels, emb_dim, (patch_size, patch_size), strides=(patch_stride, patch_stride),
          padding="VALID",
          kernel_init=jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
          bias_init=torch_bound, promote_dtype=matmul_promote(compute_dtype),
          preferred_element_type=jnp.float32, rngs=rngs)
    else:
      raise ValueError(f"patch_mode must be 0 or 1, got {patch_mode} (2/3 are not ported)")
    normal = jax.nn.initializers.normal(1.0)  # cls and positions are N(0, 1), not 0.02
    self.cls_token = nnx.Param(normal(rngs.params(), (1, 1, emb_dim)))
    self.pos_embedding = nnx.Param(normal(rngs.params(), (self.num_patches + 1, emb_dim)))

  def __call__(self, images_NxHxWxC: jax.Array, *, key: jax.Array | None) -> jax.Array:
    if self.patch_mode == 0:
      patches = unfold_patches(images_NxHxWxC, self.patch_size, self.patch_stride)
      tokens_NxPxD = self.projection(patches)
    else:
      conv_NxRxKxD = self.projection(images_NxHxWxC)
      tokens_NxPxD = conv_NxRxKxD.reshape(conv_NxRxKxD.shape[0], self.num_patches, -1)
    n, _, emb_dim = tokens_NxPxD.shape
    cls_Nx1xD = jnp.broadcast_to(self.cls_token[...], (n, 1, emb_dim))
    tokens_NxTxD = jnp.concatenate([cls_Nx1xD, tokens_NxPxD], axis=1) + self.pos_embedding[...]
    return dropout(tokens_NxTxD, self.p_dropout, key)


class Attention(nnx.Module):
  """Pre-norm multi-head attention with full-width heads (head dim = D, inner width H*D, §3.2)."""

  def __init__(
      self,
      emb_dim: int,
      num_heads: int,
      *,
      t_dropout: float,
      use_lsa: bool,
      use_bias: bool,
      fused: bool,
      compute_dtype: str,
      rngs: nnx.Rngs,
  ):
    self.num_heads, self.t_dropout, self.use_lsa, self.fused = num_heads, t_dropout, use_lsa, fused
    self.dtype = COMPUTE_DTYPES[compute_dtype]
    inner = emb_dim * num_heads
    self.layer_norm = layer_norm(emb_dim, rngs=rngs)
    self.to_qkv = transformer_linear(
        emb_dim, 3 * inner, use_bias=False, compute_dtype=compute_dtype, rngs=rngs)
    self.projection = transformer_linear(
        inner, emb_dim, use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)
    if use_lsa:  # learnable per-head temperature, initialised to the fixed scale D^-0.5
      self.scale = nnx.Param(jnp.full((num_heads,), emb_dim**-0.5, jnp.float32))
    else:
      self.scale = emb_dim**-0.5  # a buffer in the original; a Python constant here

  def _head_scale(self) -> jax.Array | float:
    return self.scale[...] if self.use_lsa else self.scale

  def _reference(self, q, k, v, key):
    """Explicit softmax attention; returns (out [N,T,H,D], probs [N,H,T,T] before dropout)."""
    logits_NxHxTxT = jnp.einsum(
        "nqhd,nkhd->nhqk", q.astype(self.dtype), k.astype(self.dtype),
        preferred_element_type=jnp.float32)
    scale = self._head_scale()
    logits_NxHxTxT = logits_NxHxTxT * (scale[:, None, None] if self.use_lsa else scale)
    if self.use_lsa:  # a token may not attend to itself (cls included)
      eye = jnp.eye(logits_NxHxTxT.shape[-1], dtype=bool)
      logits_NxHxTxT = jnp.where(eye, -jnp.finfo(jnp.float32).max, logits_NxHxTxT)
    probs_NxHxTxT = jax.nn.softmax(logits_NxHxTxT, axis=-1)
    dropped = dropout(probs_NxHxTxT, self.t_dropout, key)
    out_NxTxHxD = jnp.einsum(
        "nhqk,nkhd->nqhd", dropped.astype(self.dtype), v.astype(self.dtype),
        preferred_element_type=jnp.float32)
    return out_NxTxHxD, probs_NxHxTxT

  def _fused(self, q, k, v):
    """jax.nn.dot_product_attention; the scale must be explicit (its default is 1/sqrt(D))."""
    if self.use_lsa:  # per-head scale folded into q: (s q)·k = s (q·k)
      q = q * self._head_scale()[:, None]
      scale, mask = 1.0, ~jnp.eye(q.shape[1], dtype=bool)[None, None]
    else:
      scale, mask = self.scale, None
    out = jax.nn.dot_product_attention(
        q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype), mask=mask, scale=scale)
    return out.astype(jnp.float32)

  def __call__(
      self, t_NxTxD: jax.Array, *, key: jax.Array | None, return_attention: bool = False
  ) -> tuple[jax.Array, jax.Array | None]:
    n, num_tokens, _ = t_NxTxD.shape
    qkv_NxTx3I = self.to_qkv(self.layer_norm(t_NxTxD))
    # Split q, k, v, then "(h d)" head-major: head h owns dims [h*D, (h+1)*D) of each.
    q, k, v = (x.reshape(n, num_tokens, self.num_heads, -1) for x in jnp.split(qkv_NxTx3I, 3, -1))
    prob_key, out_key = split_key(key, 2)
    # The fused kernel neither returns probabilities nor drops them out: fall back to the
    # reference path when they are requested or when attention dropout is active (training).
    use_fused = self.fused and not return_attention and (key is None or self.t_dropout == 0.0)
    if use_fused:
      out_NxTxHxD, probs = self._fused(q, k, v), None
    else:
      out_NxTxHxD, probs = self._reference(q, k, v, prob_key)
    out_NxTxD = self.projection(out_NxTxHxD.reshape(n, num_tokens, -1))
    return dropout(out_NxTxD, self.t_dropout, out_key), probs if return_attention else None


class MLP(nnx.Module):
  """LayerNorm, Linear(D -> mlp_dim), exact GELU, dropout, Linear(-> D), dropout."""

  def __init__(
      self, emb_dim: int, mlp_dim: int, *, t_dropout: float, use_bias: bool, compute_dtype: str,
      rngs: nnx.Rngs,
  ):
    self.t_dropout = t_dropout
    self.layer_norm = layer_norm(emb_dim, rngs=rngs)
    self.fc1 = transformer_linear(
        emb_dim, mlp_dim, use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)
    self.fc2 = transformer_linear(
        mlp_dim, emb_dim, use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)

  def __call__(self, t_NxTxD: jax.Array, *, key: jax.Array | None) -> jax.Array:
    key1, key2 = split_key(key, 2)
    h = jax.nn.gelu(self.fc1(self.layer_norm(t_NxTxD)), approximate=False)  # erf GELU (§14.2)
    h = self.fc2(dropout(h, self.t_dropout, key1))
    return dropout(h, self.t_dropout, key2)


class BehaviorMLP(nnx.Module):
  """B-MLP: Linear(d_b -> D//2), tanh, Linear(-> D), tanh (its dropout is always p=0, omitted)."""

  def __init__(
      self, behavior_dim: int, emb_dim: int, *, use_bias: bool, compute_dtype: str, rngs: nnx.Rngs
  ):
    self.fc1 = transformer_linear(
        behavior_dim, emb_dim // 2, use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)
    self.fc2 = transformer_linear(
        emb_dim // 2, emb_dim, use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)

  def __call__(self, behavior_NxF: jax.Array) -> jax.Array:
    return jnp.tanh(self.fc2(jnp.tanh(self.fc1(behavior_NxF))))


class Block(nnx.Module):
  """t += B-MLP(b) (all tokens, cls included); t += DropPath(Attn(t)); t += DropPath(MLP(t))."""

  def __init__(
      self,
      *,
      emb_dim: int,
      num_heads: int,
      mlp_dim: int,
      t_dropout: float,
      drop_path: float,
      use_lsa: bool,
      use_bias: bool,
      fused: bool,
      behavior_dim: int,
      bmlp_mice: int | None,
      compute_dtype: str,
      rngs: nnx.Rngs,
  ):
    self.drop_path_rate = drop_path
    self.mha = Attention(
        emb_dim, num_heads, t_dropout=t_dropout, use_lsa=use_lsa, use_bias=use_bias, fused=fused,
        compute_dtype=compute_dtype, rngs=rngs)
    self.mlp = MLP(emb_dim, mlp_dim, t_dropout=t_dropout, use_bias=use_bias,
                   compute_dtype=compute_dtype, rngs=rngs)
    make_bmlp = functools.partial(
        BehaviorMLP, behavior_dim, emb_dim, use_bias=use_bias, compute_dtype=compute_dtype)
    self.per_mouse_bmlp = bmlp_mice is not None
    if not behavior_dim:
      self.bmlp = None
    elif self.per_mouse_bmlp:  # behavior_mode 4: one B-MLP per mouse, leading mouse axis
      self.bmlp = stack_per_mouse(make_bmlp, bmlp_mice, rngs)
    else:  # behavior_mode 2/3: one B-MLP shared by all mice
      self.bmlp = make_bmlp(rngs=rngs)

  def behavior_tokens(self, behavior_MxBxF: jax.Array) -> jax.Array:
    """B-MLP output on the merged [M*B, D] axis."""
    mice, batch, features = behavior_MxBxF.shape
    if self.per_mouse_bmlp:
      return apply_per_mouse(self.bmlp, behavior_MxBxF).reshape(mice * batch, -1)
    return self.bmlp(behavior_MxBxF.reshape(mice * batch, features))

  def __call__(
      self,
      t_NxTxD: jax.Array,
      behavior_MxBxF: jax.Array | None,
      *,
      key: jax.Array | None,
      return_attention: bool,
  ) -> tuple[jax.Array, jax.Array | None]:
    attn_key, mlp_key, path_key1, path_key2 = split_key(key, 4)
    if self.bmlp is not None:
      t_NxTxD = t_NxTxD + self.behavior_tokens(behavior_MxBxF)[:, None, :]
    attn_NxTxD, probs = self.mha(t_NxTxD, key=attn_key, return_attention=return_attention)
    t_NxTxD = t_NxTxD + drop_path(attn_NxTxD, self.drop_path_rate, path_key1)
    t_NxTxD = t_NxTxD + drop_path(self.mlp(t_NxTxD, key=mlp_key), self.drop_path_rate, path_key2)
    return t_NxTxD, probs


class ViTCore(nnx.Module):
  """Patch embedding, L pre-norm blocks, no final LayerNorm, cls dropped, tokens -> (h, w, D)."""

  def __init__(
      self,
      image_shape: Sequence[int],
      *,
      patch_size: int,
      patch_stride: int,
      patch_mode: int,
      emb_dim: int,
      num_heads: int,
      num_blocks: int,
      mlp_dim: int,
      p_dropout: float,
      t_dropout: float,
      drop_path: float,
      use_lsa: bool,
      disable_bias: bool,
      behavior_dim: int,
      bmlp_mice: int | None,
      attention: str,
      compute_dtype: str,
      rngs: nnx.Rngs,
  ):
    """image_shape: (H, W, C) of the core input; behavior_dim 0 = no B-MLP;
    bmlp_mice: number of mice for per-mouse B-MLPs (behavior_mode 4), else None."""
    self.patch_embedding = PatchEmbedding(
        image_shape, patch_size=patch_size, patch_stride=patch_stride, patch_mode=patch_mode,
        emb_dim=emb_dim, p_dropout=p_dropout, compute_dtype=compute_dtype, rngs=rngs)
    self.blocks = nnx.List([
        Block(emb_dim=emb_dim, num_heads=num_heads, mlp_dim=mlp_dim, t_dropout=t_dropout,
              drop_path=drop_path, use_lsa=use_lsa, use_bias=not disable_bias,
              fused=attention == "fused", behavior_dim=behavior_dim, bmlp_mice=bmlp_mice,
              compute_dtype=compute_dtype, rngs=rngs)
        for _ in range(num_blocks)
    ])
    self.map_hw = find_shape(self.patch_embedding.num_patches)
    self.output_shape = (*self.map_hw, emb_dim)  # channels-last (h, w, D), e.g. (29, 57, 155)

  def __call__(
      self,
      images_MxBxHxWxC: jax.Array,
      behavior_MxBxF: jax.Array | None,
      *,
      key: jax.Array | None,
      return_attention: bool = False,
  ) -> tuple[jax.Array, jax.Array | None]:
    """Returns (feature map [M, B, h, w, D], attention probs [M, B, L, H, T, T] or None)."""
    mice, batch = images_MxBxHxWxC.shape[:2]
    images_NxHxWxC = images_MxBxHxWxC.reshape((mice * batch,) + images_MxBxHxWxC.shape[2:])
    embed_key, *block_keys = split_key(key, 1 + len(self.blocks))
    t_NxTxD = self.patch_embedding(images_NxHxWxC, key=embed_key)
    all_probs = []
    for block, block_key in zip(self.blocks, block_keys):
      t_NxTxD, probs = block(t_NxTxD, behavior_MxBxF, key=block_key,
                             return_attention=return_attention)
      all_probs.append(probs)
    # Drop cls, then "b (h w) c" -> channels-last (h, w, c) with find_shape's (h, w).
    feat = t_NxTxD[:, 1:].reshape((mice, batch) + self.output_shape)
    if not return_attention:
      return feat, None
    probs_NxLxHxTxT = jnp.stack(all_probs, axis=1)
    return feat, probs_NxLxHxTxT.reshape((mice, batch) + probs_NxLxHxTxT.shape[1:])
