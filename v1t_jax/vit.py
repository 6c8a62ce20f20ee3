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
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

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
  """Inverted dropout (PyTorch semantics); identity when key is None or rate is 0.

  The mask is jax.random.bernoulli(key, 1 - rate, x.shape), bit for bit (see `keep_mask`).
  """
  if key is None or rate == 0.0:
    return x
  keep = keep_mask(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


# ---------------------------------------------------------------------------------------------
# Dropout masks: the bits of jax.random.bernoulli without its slow CPU lowering.
#
# JAX lowers Threefry on CPU as a rolled loop over whole arrays (rotation amounts in the loop
# state), ~50 ns per element on our 2-core VM: the attention masks of one default train step
# (~700M elements for 16 examples) took longer than the attention matmuls. The same hash written
# out with constant rotations fuses into its consumer and vectorises, ~10x faster. With JAX's
# default `jax_threefry_partitionable`, element i of a bits array of any shape is
# threefry(key, (i >> 32, i & 0xffffffff)) with the two output words xor-ed, so any contiguous
# range of a mask can be made alone (attention makes its mask chunk by chunk).

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def _threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array):
  """The Threefry-2x32 block cipher, 20 rounds (Salmon et al. 2011), on uint32 arrays."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(_THREEFRY_PARITY))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = (x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))
      x2 = x1 ^ x2
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _fast_bits_apply(key: jax.Array) -> bool:
  """True when jax.random's bits are the partitionable Threefry that `keep_mask` reproduces."""
  return (str(jax.random.key_impl(key)) == "threefry2x32"
          and bool(jax.config.jax_threefry_partitionable))


def keep_mask(
    key: jax.Array,
    keep: float,
    shape: Sequence[int],
    *,
    full_shape: Sequence[int] | None = None,
    block: jax.Array | int = 0,
) -> jax.Array:
  """jax.random.bernoulli(key, keep, full_shape), bit for bit, or one block of it.

  With `full_shape`, returns block number `block` (static or traced) of the flattened mask cut
  into consecutive pieces of prod(shape) elements, shaped `shape`: e.g. full_shape [N, H, T, T],
  shape [c, H, T, T] and block b give the mask of examples [b*c, (b+1)*c).
  """
  words = keep_words(key, keep, shape, full_shape=full_shape, block=block)
  if words is None:
    full_shape = tuple(shape) if full_shape is None else tuple(full_shape)
    full = jax.random.bernoulli(key, keep, full_shape).reshape(-1)
    size = math.prod(shape)
    return jax.lax.dynamic_slice_in_dim(full, block * size, size).reshape(shape)
  return unpack_keep_words(words, shape[-1])


def keep_words(
    key: jax.Array,
    keep: float,
    shape: Sequence[int],
    *,
    full_shape: Sequence[int] | None = None,
    block: jax.Array | int = 0,
) -> jax.Array | None:
  """`keep_mask`'s mask packed 32 positions of the last axis per uint32 word (bit j of word w is
  position 32 w + j), shape [*shape[:-1], ceil(shape[-1] / 32)]; None where the key's bits are
  not the Threefry that we reproduce (`keep_mask` then calls jax.random.bernoulli).

  32x smaller than the boolean mask: the attention backward pass keeps these words instead of
  hashing again (one eighth of a byte per logit).
  """
  full_shape = tuple(shape) if full_shape is None else tuple(full_shape)
  size, full_size = math.prod(shape), math.prod(full_shape)
  if full_size % size:
    raise ValueError(f"blocks of {tuple(shape)} do not tile {full_shape}")
  *lead, length = shape
  words = -(-length // 32)
  if not _fast_bits_apply(key) or size >= 2**32 or full_size // size > 2**16:
    return None
  # bernoulli(p) is uniform < p, the uniform being (bits >> 9) * 2^-23: compare the bits.
  p = float(np.float32(keep))
  if p >= 1.0 or p <= 0.0:
    return jnp.full(tuple(lead) + (words,), np.uint32(0xFFFFFFFF if p >= 1.0 else 0))
  threshold = np.uint32(math.ceil(p * 2**23) << 9)
  # 64-bit start index block * size as (hi, lo) uint32 words, with 16-bit limbs of size.
  block = jnp.asarray(block, jnp.uint32)
  low_part = block * np.uint32(size & 0xFFFF)
  high_part = block * np.uint32(size >> 16)
  start_lo = (high_part << np.uint32(16)) + low_part
  start_hi = (high_part >> np.uint32(16)) + (start_lo < low_part).astype(jnp.uint32)
  # The mask is made as 32-bit words, 32 positions of the last axis each: XLA fuses the hash
  # into that reduction once, where it would copy an elementwise hash into every fusion that
  # reads the mask (forward and backward consumers), each time paying ~100 integer ops per bit.
  lead_index = jax.lax.iota(jnp.uint32, math.prod(lead)).reshape(tuple(lead) + (1, 1))
  bit = jax.lax.broadcasted_iota(jnp.uint32, (words, 32), 1)
  position = jax.lax.broadcasted_iota(jnp.uint32, (words, 32), 0) * np.uint32(32) + bit
  local = lead_index * np.uint32(length) + position   # padding positions: ignored when unpacked
  lo = start_lo + local
  hi = start_hi + (lo < local).astype(jnp.uint32)
  k1, k2 = jax.random.key_data(key)
  bits1, bits2 = _threefry2x32(k1, k2, hi, lo)
  kept = ((bits1 ^ bits2) < threshold).astype(jnp.uint32) << bit
  return jax.lax.reduce(kept, np.uint32(0), jax.lax.bitwise_or, (kept.ndim - 1,))


def unpack_keep_words(words: jax.Array, length: int) -> jax.Array:
  """The boolean mask [..., length] of `keep_words`'s packed [..., ceil(length / 32)] words."""
  unpacked = (words[..., None] >> jax.lax.broadcasted_iota(jnp.uint32, (words.shape[-1], 32), 1)) & 1
  return unpacked.reshape(words.shape[:-1] + (words.shape[-1] * 32,))[..., :length].astype(bool)


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


# Attention memory and speed. A default block's attention logits are [N, 4, 1654, 1654] floats,
# 44 MB per example. They are computed in chunks of (example, head) rows so that no [N, H, T, T]
# array beyond one chunk's is alive at once; the backward pass keeps the probabilities (4 bytes per
# logit, the dropout decision in their sign) of the first blocks while their total fits
# `SAVE_PROBS_LOGITS`, and recomputes the others' chunk by chunk (one more T x T x D matmul per
# head, ~3% of a default train step per block) from their packed dropout masks (1 bit per logit,
# kept because hashing them again cost ~6% of the step): with 16 examples (175M logits per block)
# the first block keeps its probabilities, which holds a default train step's XLA temporaries
# under 5 GiB.
ATTENTION_PROBS = "attention_probs"  # checkpoint name of the softmax output (autodiff path)
ATTENTION_CHUNK_LOGITS = 2**25  # logits per chunk (128 MiB of float32)
SAVE_PROBS_LOGITS = 2**28  # all blocks together: keep up to 1 GiB of probabilities


def attention_chunk(rows: int, logits_per_row: int) -> int:
  """Rows per attention chunk: the largest divisor of rows whose logits fit the chunk budget."""
  return max(c for c in range(1, rows + 1)
             if rows % c == 0 and (c == 1 or c * logits_per_row <= ATTENTION_CHUNK_LOGITS))


def save_attention_probs(rows: int, num_tokens: int, block_index: int = 0) -> bool:
  """Whether the backward pass keeps block `block_index`'s attention probabilities (else
  recomputes them): blocks 0..block_index together within `SAVE_PROBS_LOGITS`."""
  return (block_index + 1) * rows * num_tokens * num_tokens <= SAVE_PROBS_LOGITS


def map_chunks(fn, chunk: int, *arrays):
  """fn(block, *arrays[block * chunk:(block + 1) * chunk]) over consecutive chunks of the leading
  axis, one at a time (`lax.map`; a direct call when one chunk holds everything), with the
  outputs (a pytree, Nones allowed) joined back along the leading axis."""
  num = arrays[0].shape[0]
  if chunk == num:
    return fn(0, *arrays)
  split = lambda x: x.reshape((num // chunk, chunk) + x.shape[1:])
  out = jax.lax.map(lambda a: fn(*a), (jnp.arange(num // chunk), *map(split, arrays)))
  return jax.tree.map(lambda y: y.reshape((num,) + y.shape[2:]), out)


def _signed_probs(q, k, key, block, num_rows, scale, keep, dtype, words=None):
  """softmax(q k^T scale) of [c, T, D] rows, negated where dropout drops the entry.

  The sign carries the dropout decision at no memory cost: probabilities are >= 0, and where one
  is exactly 0 the decision does not matter (it contributes nothing either way). `words`: the
  chunk's packed dropout mask (`keep_words`) when already made.
  """
  logits = jnp.einsum("nqd,nkd->nqk", q.astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1)
  if keep < 1.0:
    if words is None:
      mask = keep_mask(key, keep, probs.shape, full_shape=(num_rows,) + probs.shape[1:],
                       block=block)
    else:
      mask = unpack_keep_words(words, probs.shape[-1])
    probs = jnp.where(mask, probs, -probs)
  return probs


def _dropped(signed, keep):
  """Dropped-out probabilities (inverted dropout) from signed ones."""
  return signed if keep >= 1.0 else jnp.maximum(signed, 0.0) / keep


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _attend(q, k, v, key, block, num_rows, scale, keep, save, dtype):
  """Dropout(softmax(q k^T scale)) v for one chunk of [c, T, D] rows, with a hand-written VJP.

  The VJP keeps (or recomputes) only the signed probabilities and gets softmax's row term from
  the outputs (sum_j P_ij dP_ij = dO_i . O_i), so the dropout mask is drawn once per pass and
  no other [c, T, T] array is saved. `block`: this chunk's index among num_rows / c.
  """
  return _attend_fwd(q, k, v, key, block, num_rows, scale, keep, save, dtype)[0]


def _attend_fwd(q, k, v, key, block, num_rows, scale, keep, save, dtype):
  words = None
  if keep < 1.0 and not save:
    # Recomputed in the backward pass: keep the packed mask (1 bit per logit), not its hash.
    words = keep_words(key, keep, (q.shape[0], q.shape[1], k.shape[1]),
                       full_shape=(num_rows, q.shape[1], k.shape[1]), block=block)
  signed = _signed_probs(q, k, key, block, num_rows, scale, keep, dtype, words)
  out = jnp.einsum("nqk,nkd->nqd", _dropped(signed, keep).astype(dtype), v.astype(dtype),
                   preferred_element_type=jnp.float32)
  return out, (q, k, v, key, block, signed if save else None, words, out)


def _attend_bwd(num_rows, scale, keep, save, dtype, residuals, d_out):
  del save
  q, k, v, key, block, signed, words, out = residuals
  if signed is None:
    signed = _signed_probs(q, k, key, block, num_rows, scale, keep, dtype, words)
  d_dropped = jnp.einsum("nqd,nkd->nqk", d_out.astype(dtype), v.astype(dtype),
                         preferred_element_type=jnp.float32)
  row_term = jnp.sum(d_out * out, axis=-1, keepdims=True)
  d_probs = d_dropped if keep >= 1.0 else jnp.where(signed > 0.0, d_dropped / keep, 0.0)
  d_logits = (jnp.abs(signed) * (d_probs - row_term) * scale).astype(dtype)
  dq = jnp.einsum("nqk,nkd->nqd", d_logits, k.astype(dtype), preferred_element_type=jnp.float32)
  dk = jnp.einsum("nqk,nqd->nkd", d_logits, q.astype(dtype), preferred_element_type=jnp.float32)
  dv = jnp.einsum("nqk,nqd->nkd", _dropped(signed, keep).astype(dtype), d_out.astype(dtype),
                  preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


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
      block_index: int = 0,
  ):
    """block_index: the block's position in the core (which blocks keep attention
    probabilities for the backward pass, see `save_attention_probs`)."""
    self.num_heads, self.t_dropout, self.use_lsa, self.fused = num_heads, t_dropout, use_lsa, fused
    self.block_index = block_index
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

  def _chunk(self, q, k, v, key, block, num_examples):
    """Softmax attention of one chunk of examples, head-major [c, H, T, D] operands.

    Returns (out [c, H, T, D], probs [c, H, T, T] before dropout). The dropout mask is block
    `block` of the [num_examples, H, T, T] mask, so chunking never changes the random bits.
    """
    logits = jnp.einsum("nhqd,nhkd->nhqk", q.astype(self.dtype), k.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    scale = self._head_scale()
    logits = logits * (scale[:, None, None] if self.use_lsa else scale)
    if self.use_lsa:  # a token may not attend to itself (cls included)
      eye = jnp.eye(logits.shape[-1], dtype=bool)
      logits = jnp.where(eye, -jnp.finfo(jnp.float32).max, logits)
    probs = checkpoint_name(jax.nn.softmax(logits, axis=-1), ATTENTION_PROBS)
    dropped = probs
    if key is not None and self.t_dropout > 0.0:
      keep = keep_mask(key, 1.0 - self.t_dropout, probs.shape,
                       full_shape=(num_examples,) + probs.shape[1:], block=block)
      dropped = jnp.where(keep, probs / (1.0 - self.t_dropout), 0.0)
    out = jnp.einsum("nhqk,nhkd->nhqd", dropped.astype(self.dtype), v.astype(self.dtype),
                     preferred_element_type=jnp.float32)
    return out, probs

  def _reference(self, q, k, v, key, return_probs):
    """Explicit softmax attention by autodiff; returns (out [N,T,H,D], probs [N,H,T,T] before
    dropout, or None). The path of LSA and of requested probabilities; runs in chunks of
    examples, each rematerialised (probabilities kept where `save_attention_probs`)."""
    n, t, h, _ = q.shape
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))   # head-major [N, H, T, D]
    chunk = attention_chunk(n, h * t * t)
    policy = (jax.checkpoint_policies.save_only_these_names(ATTENTION_PROBS)
              if save_attention_probs(n * h, t, self.block_index)
              else jax.checkpoint_policies.nothing_saveable)

    @functools.partial(jax.checkpoint, policy=policy)
    def run(block, q, k, v):
      out, probs = self._chunk(q, k, v, key, block, n)
      return out, (probs if return_probs else None)

    out, probs = map_chunks(run, chunk, q, k, v)
    return out.transpose(0, 2, 1, 3), probs

  def _fast(self, q, k, v, key):
    """The same attention as `_reference` without probabilities or LSA, with a hand-written
    backward pass (`_attend`), in chunks of (example, head) rows. Returns out [N, T, H, D]."""
    n, t, h, d = q.shape
    rows = n * h
    q, k, v = (x.transpose(0, 2, 1, 3).reshape(rows, t, d) for x in (q, k, v))
    keep = 1.0 if key is None else 1.0 - self.t_dropout
    chunk = attention_chunk(rows, t * t)
    attend = functools.partial(_attend, num_rows=rows, scale=self.scale, keep=keep,
                               save=save_attention_probs(rows, t, self.block_index),
                               dtype=self.dtype)
    out = map_chunks(lambda block, q, k, v: attend(q, k, v, key, block), chunk, q, k, v)
    return out.reshape(n, h, t, d).transpose(0, 2, 1, 3)

  def _fused(self, q, k, v):
    """jax.nn.dot_product_attention; the scale must be explicit (its default is 1/sqrt(D))."""
    if self.use_lsa:  # per-head scale folded into q: (s q)·k = s (q·k)
      q = q * self._head_scale()[:, None]
      scale, mask = 1.0, ~jnp.eye(q.shape[1], dtype=bool)[None, None]
    else:
      scale, mask = self.scale, None
    # Zero-pad the head width to a multiple of 8 (155 -> 160), which cuDNN's flash attention
    # needs: the zeros add nothing to q.k and give zero output columns, sliced off (exact).
    d = q.shape[-1]
    widths = ((0, 0),) * (q.ndim - 1) + ((0, -d % 8),)
    q, k, v = (jnp.pad(x.astype(self.dtype), widths) for x in (q, k, v))
    # jax picks XLA's attention unless asked: request cuDNN's flash kernel where it applies
    # (GPU, 16-bit operands).
    cudnn = jax.default_backend() == "gpu" and self.dtype in (jnp.bfloat16, jnp.float16)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                       implementation="cudnn" if cudnn else None)
    return out[..., :d].astype(jnp.float32)

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
    elif return_attention or self.use_lsa:
      out_NxTxHxD, probs = self._reference(q, k, v, prob_key, return_attention)
    else:
      out_NxTxHxD, probs = self._fast(q, k, v, prob_key), None
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
      block_index: int = 0,
  ):
    self.drop_path_rate = drop_path
    self.mha = Attention(
        emb_dim, num_heads, t_dropout=t_dropout, use_lsa=use_lsa, use_bias=use_bias, fused=fused,
        compute_dtype=compute_dtype, rngs=rngs, block_index=block_index)
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
              compute_dtype=compute_dtype, rngs=rngs, block_index=i)
        for i in range(num_blocks)
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
