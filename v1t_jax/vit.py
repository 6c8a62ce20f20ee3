"""The ViT core of V1T (model_spec.md §3).

Layout: channels-last. The core sees the merged [N = M*B] axis of a [M, B, ...] batch and returns
a [M, B, h, w, D] feature map. Randomness is explicit: the core splits its `key` once into one key
per random draw and hands each module its keys (None: a deterministic, evaluation pass).
Precision: see `layers`; the residual stream, softmax and LayerNorm statistics stay float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from v1t_jax import layers

ATTENTION_PROBS = "attention_probs"  # checkpoint name of the softmax output
KEYS_PER_BLOCK = 6  # random draws in a training block: attention 2, MLP 2, drop paths 2
# train.remat: what each block keeps for the backward pass (the rest is recomputed). Results are
# identical under every policy; only memory and time change.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep everything autodiff saves
    "attention": jax.checkpoint_policies.save_only_these_names(
        ATTENTION_PROBS, layers.DROPOUT_MASK),  # keep probabilities and masks, recompute the rest
    "block": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
}


def patch_grid(image_hw: Sequence[int], patch_size: int, stride: int) -> tuple[int, int]:
  """(rows, cols) of VALID patches, e.g. (29, 57) for 36x64 with P=8, S=1 (§3)."""
  rows, cols = ((n - patch_size) // stride + 1 for n in image_hw)
  if rows < 1 or cols < 1:
    raise ValueError(f"patch_size {patch_size} does not fit an image of {tuple(image_hw)}")
  return rows, cols


def find_shape(num_patches: int) -> tuple[int, int]:
  """The original's `find_shape` (§3.3): h = the largest divisor of n_p <= ceil(sqrt(n_p)).

  It only factorises the count, so it can disagree with the true patch grid (P=8, S=4 on 36x64:
  grid 8x15, this gives 10x12 and scrambles the layout); reproduced for parity.
  """
  h = math.ceil(math.sqrt(num_patches))
  while num_patches % h:
    h -= 1
  return h, num_patches // h


class PatchEmbedding(nnx.Module):
  """§3.1: patches -> tokens, cls token prepended, learned positional embedding, dropout."""

  def __init__(self, image_shape: Sequence[int], *, patch_size: int, patch_stride: int,
               patch_mode: int, emb_dim: int, p_dropout: float, compute_dtype: str,
               rngs: nnx.Rngs):
    height, width, channels = image_shape
    rows, cols = patch_grid((height, width), patch_size, patch_stride)
    self.num_patches = rows * cols
    self.patch_size, self.patch_stride, self.patch_mode = patch_size, patch_stride, patch_mode
    self.p_dropout = p_dropout
    self.dtype = layers.COMPUTE_DTYPES[compute_dtype]
    fan_in = channels * patch_size * patch_size
    torch_bound = layers.symmetric_uniform(fan_in**-0.5)
    if patch_mode == 0:  # unfold + Linear, PyTorch's default init (U(±1/8) by default)
      self.projection = layers.linear(
          fan_in, emb_dim, kernel_init=torch_bound, bias_init=torch_bound,
          compute_dtype=compute_dtype, rngs=rngs)
    elif patch_mode == 1:
      # kaiming_normal_ weight; the spec names no bias init, so PyTorch's Conv2d default (assumed).
      self.projection = nnx.Conv(
          channels, emb_dim, (patch_size, patch_size), strides=(patch_stride, patch_stride),
          padding="VALID",
          kernel_init=jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
          bias_init=torch_bound, promote_dtype=layers.matmul_promote(compute_dtype),
          preferred_element_type=jnp.float32, rngs=rngs)
    else:
      raise ValueError(f"patch_mode must be 0 or 1, got {patch_mode} (2/3 are not ported)")
    normal = jax.nn.initializers.normal(1.0)  # cls and positions are N(0, 1), not 0.02
    self.cls_token = nnx.Param(normal(rngs.params(), (1, 1, emb_dim)))
    self.pos_embedding = nnx.Param(normal(rngs.params(), (self.num_patches + 1, emb_dim)))

  def __call__(self, images_NxHxWxC: jax.Array, *, key: jax.Array | None) -> jax.Array:
    if self.patch_mode == 0:
      tokens_NxPxD = self._unfold_linear(images_NxHxWxC)
    else:
      conv_NxRxKxD = self.projection(images_NxHxWxC)
      tokens_NxPxD = conv_NxRxKxD.reshape(conv_NxRxKxD.shape[0], self.num_patches, -1)
    n, _, emb_dim = tokens_NxPxD.shape
    cls_Nx1xD = jnp.broadcast_to(self.cls_token[...], (n, 1, emb_dim))
    tokens_NxTxD = jnp.concatenate([cls_Nx1xD, tokens_NxPxD], axis=1) + self.pos_embedding[...]
    return layers.dropout(tokens_NxTxD, self.p_dropout, key)

  def _unfold_linear(self, images_NxHxWxC: jax.Array) -> jax.Array:
    """Unfold + Linear as the one convolution it equals: the Linear's kernel [C*P*P, D], rows
    indexed c*P*P + ki*P + kj (§3.1), is the conv kernel K[ki, kj, c, d]. Same parameters and
    result; XLA compiles one conv instead of P*P strided slices (docs/benchmarks.md)."""
    n, _, _, channels = images_NxHxWxC.shape
    p, s = self.patch_size, self.patch_stride
    kernel_PxPxCxD = self.projection.kernel[...].reshape(channels, p, p, -1).transpose(1, 2, 0, 3)
    conv_NxRxKxD = jax.lax.conv_general_dilated(
        images_NxHxWxC.astype(self.dtype), kernel_PxPxCxD.astype(self.dtype), (s, s), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
    return conv_NxRxKxD.reshape(n, self.num_patches, -1) + self.projection.bias[...]


class Attention(nnx.Module):
  """§3.2 Attention: pre-norm, H heads of full width D (inner width H*D), dropout on the
  probabilities and on the output. `fused`: a flash kernel where one exists (see `_fused`)."""

  def __init__(self, emb_dim: int, num_heads: int, *, t_dropout: float, use_lsa: bool,
               use_bias: bool, fused: bool, compute_dtype: str, rngs: nnx.Rngs):
    self.num_heads, self.t_dropout, self.use_lsa, self.fused = num_heads, t_dropout, use_lsa, fused
    self.dtype = layers.COMPUTE_DTYPES[compute_dtype]
    inner = num_heads * emb_dim
    self.layer_norm = layers.layer_norm(emb_dim, rngs=rngs)
    self.to_qkv = layers.transformer_linear(
        emb_dim, 3 * inner, use_bias=False, compute_dtype=compute_dtype, rngs=rngs)
    self.projection = layers.transformer_linear(
        inner, emb_dim, use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)
    if use_lsa:  # learnable per-head temperature, initialised to D^-1/2
      self.scale = nnx.Param(jnp.full((num_heads,), emb_dim**-0.5, jnp.float32))
    else:
      self.scale = emb_dim**-0.5  # a buffer in the original; a constant here

  def __call__(self, t_NxTxD: jax.Array, *, keys: Sequence[jax.Array | None] | None,
               return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Returns (output [N, T, D], probabilities [N, H, T, T] before dropout, or None).
    keys: the (probabilities, output) dropout keys, or None for a deterministic pass."""
    n, num_tokens, _ = t_NxTxD.shape
    prob_key, out_key = (None, None) if keys is None else keys
    u_NxTxD = self.layer_norm(t_NxTxD)
    qkv_NxTx3HD = self.to_qkv(u_NxTxD)
    # q, k, v in that order, each "(h d)" head-major: head h owns dims [h*D, (h+1)*D).
    q_NxTxHxD, k_NxTxHxD, v_NxTxHxD = (
        x.reshape(n, num_tokens, self.num_heads, -1) for x in jnp.split(qkv_NxTx3HD, 3, -1))
    if self.fused and not return_attention:
      o_NxTxHxD, probs_NxHxTxT = self._fused(q_NxTxHxD, k_NxTxHxD, v_NxTxHxD, prob_key), None
    else:
      logits_NxHxTxT = jnp.einsum(
          "nqhd,nkhd->nhqk", q_NxTxHxD.astype(self.dtype), k_NxTxHxD.astype(self.dtype),
          preferred_element_type=jnp.float32) * self.head_scale()[:, None, None]
      if self.use_lsa:  # a token may not attend to itself (cls included)
        diagonal_TxT = jnp.eye(num_tokens, dtype=bool)
        logits_NxHxTxT = jnp.where(diagonal_TxT, -jnp.finfo(jnp.float32).max, logits_NxHxTxT)
      probs_NxHxTxT = checkpoint_name(jax.nn.softmax(logits_NxHxTxT, axis=-1), ATTENTION_PROBS)
      dropped_NxHxTxT = layers.dropout(probs_NxHxTxT, self.t_dropout, prob_key)
      o_NxTxHxD = jnp.einsum(
          "nhqk,nkhd->nqhd", dropped_NxHxTxT.astype(self.dtype), v_NxTxHxD.astype(self.dtype),
          preferred_element_type=jnp.float32)
    out_NxTxD = self.projection(o_NxTxHxD.reshape(n, num_tokens, -1))  # heads merged "(h d)"
    return (layers.dropout(out_NxTxD, self.t_dropout, out_key),
            probs_NxHxTxT if return_attention else None)

  def head_scale(self) -> jax.Array:
    """[H] logit scale: D^-1/2 for every head, or LSA's learned temperatures."""
    if self.use_lsa:
      return self.scale[...]
    return jnp.full((self.num_heads,), self.scale, jnp.float32)

  def _fused(self, q_NxTxHxD, k_NxTxHxD, v_NxTxHxD, prob_key):
    """Flash attention: our Pallas kernel (dropout inside) when dropping out on a GPU, else
    jax.nn.dot_product_attention (cuDNN on GPU with 16-bit operands), which has no dropout."""
    dropping = prob_key is not None and self.t_dropout > 0.0
    if dropping:
      if jax.default_backend() != "gpu" or self.use_lsa:
        raise ValueError(
            "model.attention='fused' with attention dropout (training, t_dropout > 0) needs the "
            f"Pallas GPU kernel, which has no LSA; backend {jax.default_backend()!r}, use_lsa "
            f"{self.use_lsa}: use model.attention='explicit' (same model) or t_dropout=0")
      from v1t_jax import flash_attention  # Pallas loads only for this path
      seed_u32x2 = jax.random.bits(prob_key, (2,), jnp.uint32)
      to_heads = lambda x: x.astype(self.dtype).transpose(0, 2, 1, 3)
      o_NxHxTxD = flash_attention.flash_attention(
          to_heads(q_NxTxHxD), to_heads(k_NxTxHxD), to_heads(v_NxTxHxD), scale=self.scale,
          dropout_rate=self.t_dropout, seed=seed_u32x2)
      return o_NxHxTxD.transpose(0, 2, 1, 3).astype(jnp.float32)
    q_NxTxHxD = q_NxTxHxD * self.head_scale()[:, None]  # (s q).k = s (q.k): per-head LSA scale
    mask = ~jnp.eye(q_NxTxHxD.shape[1], dtype=bool)[None, None] if self.use_lsa else None
    # Zero-pad the head width to a multiple of 8 (155 -> 160), as cuDNN needs: exact.
    d = q_NxTxHxD.shape[-1]
    widths = ((0, 0),) * 3 + ((0, -d % 8),)
    q, k, v = (jnp.pad(x.astype(self.dtype), widths) for x in (q_NxTxHxD, k_NxTxHxD, v_NxTxHxD))
    cudnn = jax.default_backend() == "gpu" and self.dtype == jnp.bfloat16
    o_NxTxHxD = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0,
                                             implementation="cudnn" if cudnn else None)
    return o_NxTxHxD[..., :d].astype(jnp.float32)


class MLP(nnx.Module):
  """§3.2 MLP: LayerNorm, Linear(D -> M), exact GELU, dropout, Linear(M -> D), dropout."""

  def __init__(self, emb_dim: int, mlp_dim: int, *, t_dropout: float, use_bias: bool,
               compute_dtype: str, rngs: nnx.Rngs):
    self.t_dropout = t_dropout
    self.layer_norm = layers.layer_norm(emb_dim, rngs=rngs)
    self.fc1 = layers.transformer_linear(
        emb_dim, mlp_dim, use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)
    self.fc2 = layers.transformer_linear(
        mlp_dim, emb_dim, use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)

  def __call__(self, t_NxTxD: jax.Array, *, keys: Sequence[jax.Array | None] | None) -> jax.Array:
    """keys: the (hidden, output) dropout keys, or None for a deterministic pass."""
    key1, key2 = (None, None) if keys is None else keys
    h_NxTxM = jax.nn.gelu(self.fc1(self.layer_norm(t_NxTxD)), approximate=False)  # erf (§14.2)
    h_NxTxD = self.fc2(layers.dropout(h_NxTxM, self.t_dropout, key1))
    return layers.dropout(h_NxTxD, self.t_dropout, key2)


class BehaviorMLP(nnx.Module):
  """§3.2 B-MLP: Linear(d_b -> D//2), tanh, Linear(-> D), tanh (its dropout is p=0, omitted)."""

  def __init__(self, behavior_dim: int, emb_dim: int, *, use_bias: bool, compute_dtype: str,
               rngs: nnx.Rngs):
    self.fc1 = layers.transformer_linear(
        behavior_dim, emb_dim // 2, use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)
    self.fc2 = layers.transformer_linear(
        emb_dim // 2, emb_dim, use_bias=use_bias, compute_dtype=compute_dtype, rngs=rngs)

  def __call__(self, behavior_NxF: jax.Array) -> jax.Array:
    return jnp.tanh(self.fc2(jnp.tanh(self.fc1(behavior_NxF))))


class Block(nnx.Module):
  """§3.2: t += B-MLP(b) (all tokens); t += DropPath(Attn(t)); t += DropPath(MLP(t))."""

  def __init__(self, *, emb_dim: int, num_heads: int, mlp_dim: int, t_dropout: float,
               drop_path: float, use_lsa: bool, use_bias: bool, fused: bool, behavior_dim: int,
               bmlp_mice: int | None, compute_dtype: str, rngs: nnx.Rngs):
    self.drop_path = drop_path
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
      self.bmlp = layers.stack_per_mouse(make_bmlp, bmlp_mice, rngs)
    else:  # behavior_mode 2/3: one B-MLP shared by all mice
      self.bmlp = make_bmlp(rngs=rngs)

  def __call__(self, t_NxTxD: jax.Array, behavior_MxBxF: jax.Array | None, *,
               keys: Sequence[jax.Array | None] | None, return_attention: bool):
    """keys: KEYS_PER_BLOCK keys (attention, MLP, drop paths), or None: deterministic."""
    keys = (None,) * KEYS_PER_BLOCK if keys is None else keys
    attn_keys, mlp_keys, (path_key1, path_key2) = keys[0:2], keys[2:4], keys[4:6]
    if self.bmlp is not None:
      mice, batch, _ = behavior_MxBxF.shape
      if self.per_mouse_bmlp:
        b_MxBxD = layers.apply_per_mouse(self.bmlp, behavior_MxBxF)
      else:
        b_MxBxD = self.bmlp(behavior_MxBxF)
      t_NxTxD = t_NxTxD + b_MxBxD.reshape(mice * batch, 1, -1)
    a_NxTxD, probs_NxHxTxT = self.mha(t_NxTxD, keys=attn_keys, return_attention=return_attention)
    t_NxTxD = t_NxTxD + layers.drop_path(a_NxTxD, self.drop_path, path_key1)
    m_NxTxD = self.mlp(t_NxTxD, keys=mlp_keys)
    t_NxTxD = t_NxTxD + layers.drop_path(m_NxTxD, self.drop_path, path_key2)
    return t_NxTxD, probs_NxHxTxT


class ViTCore(nnx.Module):
  """§3: patch embedding, L pre-norm blocks, no final LayerNorm, cls dropped, tokens -> (h, w, D)."""

  has_attention = True   # __call__ can return the attention probabilities

  def __init__(self, image_shape: Sequence[int], *, patch_size: int, patch_stride: int,
               patch_mode: int, emb_dim: int, num_heads: int, num_blocks: int, mlp_dim: int,
               p_dropout: float, t_dropout: float, drop_path: float, use_lsa: bool,
               disable_bias: bool, behavior_dim: int, bmlp_mice: int | None, attention: str,
               compute_dtype: str, rngs: nnx.Rngs, remat: str = "none", reg_scale: float = 0.0):
    """image_shape: (H, W, C) of the core input; behavior_dim 0 = no B-MLP; bmlp_mice: number
    of mice for per-mouse B-MLPs (behavior_mode 4), else None; remat: a REMAT_POLICIES key;
    reg_scale: the weight of the core's L1 regulariser (§7, core_reg_scale)."""
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
    self.remat = remat
    self.reg_scale = reg_scale
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

  @classmethod
  def from_config(cls, config, image_shape: Sequence[int], *, num_mice: int, remat: str,
                  rngs: nnx.Rngs) -> ViTCore:
    """From the model config (model.ModelConfig: the ViT's fields are the model section's own)."""
    return cls(
        image_shape, patch_size=config.patch_size, patch_stride=config.patch_stride,
        patch_mode=config.patch_mode, emb_dim=config.emb_dim, num_heads=config.num_heads,
        num_blocks=config.num_blocks, mlp_dim=config.mlp_dim, p_dropout=config.p_dropout,
        t_dropout=config.t_dropout, drop_path=config.drop_path, use_lsa=config.use_lsa,
        disable_bias=config.disable_bias, behavior_dim=config.behavior_dim,
        bmlp_mice=num_mice if config.behavior_mode == 4 else None, attention=config.attention,
        compute_dtype=config.compute_dtype, remat=remat, reg_scale=config.core_reg_scale,
        rngs=rngs)

  def regularizer(self) -> jax.Array:
    """§7: core_reg_scale * sum |theta| over every core parameter."""
    return self.reg_scale * sum(jnp.sum(jnp.abs(x))
                                for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

  def __call__(self, images_MxBxHxWxC: jax.Array, behavior_MxBxF: jax.Array | None, *,
               train: bool, key: jax.Array | None, return_attention: bool = False):
    """Returns (feature map [M, B, h, w, D], {"attention": probs [M, B, L, H, T, T]} with
    return_attention, else {}). train: dropout and drop path on (needs key)."""
    if train and key is None:
      raise ValueError("train=True needs a PRNG key")
    mice, batch = images_MxBxHxWxC.shape[:2]
    images_NxHxWxC = images_MxBxHxWxC.reshape((mice * batch,) + images_MxBxHxWxC.shape[2:])
    # One split for the whole pass: each jax.random.split is a Threefry loop for XLA to compile.
    embed_key, *keys = layers.split_key(key if train else None,
                                        1 + KEYS_PER_BLOCK * len(self.blocks))
    t_NxTxD = self.patch_embedding(images_NxHxWxC, key=embed_key)

    def run_block(block, t_NxTxD, behavior_MxBxF, keys):
      return block(t_NxTxD, behavior_MxBxF, keys=keys, return_attention=return_attention)

    if REMAT_POLICIES[self.remat] is not None:
      run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.remat])
    all_probs = []
    for b, block in enumerate(self.blocks):
      block_keys = keys[KEYS_PER_BLOCK * b:KEYS_PER_BLOCK * (b + 1)]
      t_NxTxD, probs_NxHxTxT = run_block(block, t_NxTxD, behavior_MxBxF, block_keys)
      all_probs.append(probs_NxHxTxT)
    # Drop cls, then "b (h w) c" -> channels-last (h, w, c) with find_shape's (h, w) (§3.3).
    feat_MxBxhxwxD = t_NxTxD[:, 1:].reshape((mice, batch) + self.output_shape)
    if not return_attention:
      return feat_MxBxhxwxD, {}
    probs_NxLxHxTxT = jnp.stack(all_probs, axis=1)
    return feat_MxBxhxwxD, {
        "attention": probs_NxLxHxTxT.reshape((mice, batch) + probs_NxLxHxTxT.shape[1:])}
