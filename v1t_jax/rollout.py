"""Attention rollout (Abnar & Zuidema 2020) as V1T computes it (model_spec.md §9.1).

Input: the eval-mode softmax probabilities of one image, [L, H, T, T] (blocks, heads, tokens),
i.e. `aux["attention"][m, b]` of `V1T.__call__(..., train=False, return_attention=True)`.
Token 0 is the cls token; tokens 1..T-1 are the patches, row-major over the patch grid.

  1. heads are reduced with a max (the original's choice, not the paper's mean);
  2. A_l = (max_h P_l + I) / row sums, so every row of A_l sums to one (the identity stands for
     the residual connection);
  3. J_1 = A_1, J_l = A_l J_(l-1); the map is row 0 (cls) of J_L over columns 1..T-1;
  4. reshaped to `vit.find_shape(T - 1)` (the core's own token layout), min-max normalised to
     [0, 1] and resized to the image with PyTorch's bilinear (align_corners=False, no antialias).

All functions are pure jnp and accept any number of leading batch axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from v1t_jax import image_stage, vit


def max_over_heads(attention_LxHxTxT: jax.Array) -> jax.Array:
  """[..., L, H, T, T] -> [..., L, T, T]: the strongest head per query/key pair."""
  return jnp.max(attention_LxHxTxT, axis=-3)


def add_residual(attention_TxT: jax.Array) -> jax.Array:
  """(A + I) with every row renormalised to sum to one (accounts for the skip connection)."""
  num_tokens = attention_TxT.shape[-1]
  augmented = attention_TxT + jnp.eye(num_tokens, dtype=attention_TxT.dtype)
  return augmented / jnp.sum(augmented, axis=-1, keepdims=True)


def cls_rollout(attention_LxHxTxT: jax.Array) -> jax.Array:
  """Row 0 of J_L = A_L ... A_1 over all T tokens: [..., L, H, T, T] -> [..., T], sums to one.

  Only row 0 of the product is used, so it is computed as a chain of vector-matrix products
  e_0^T A_L A_(L-1) ... A_1 (O(L T^2) instead of the O(L T^3) full product; T = 1654 by default).
  """
  blocks = add_residual(max_over_heads(attention_LxHxTxT).astype(jnp.float32))
  row_T = blocks[..., -1, 0, :]
  for layer in range(blocks.shape[-3] - 2, -1, -1):
    row_T = jnp.einsum("...k,...kj->...j", row_T, blocks[..., layer, :, :],
                       precision=jax.lax.Precision.HIGHEST)
  return row_T


def token_grid(patch_values_P: jax.Array) -> jax.Array:
  """[..., T-1] patch values -> [..., h, w] with the core's find_shape layout (row-major)."""
  h, w = vit.find_shape(patch_values_P.shape[-1])
  return patch_values_P.reshape(patch_values_P.shape[:-1] + (h, w))


def min_max(map_hxw: jax.Array) -> jax.Array:
  """Scale each [h, w] map to [0, 1]; a constant map (no contrast) becomes all zeros.

  The original divides by (max - min) unguarded, which gives NaN for a constant map.
  """
  low = jnp.min(map_hxw, axis=(-2, -1), keepdims=True)
  span = jnp.max(map_hxw, axis=(-2, -1), keepdims=True) - low
  return jnp.where(span > 0, (map_hxw - low) / jnp.where(span > 0, span, 1.0), 0.0)


def resize_bilinear(map_hxw: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """[..., h, w] -> [..., H, W]: torchvision `F.resize(antialias=False)`, i.e. bilinear with
  align_corners=False, as a pair of interpolation matrices shared with the input pipeline."""
  h, w = map_hxw.shape[-2:]
  rows_Hxh = jnp.asarray(image_stage.bilinear_matrix(h, out_hw[0]), jnp.float32)
  cols_Wxw = jnp.asarray(image_stage.bilinear_matrix(w, out_hw[1]), jnp.float32)
  return jnp.einsum("Hh,...hw,Ww->...HW", rows_Hxh, map_hxw, cols_Wxw,
                    precision=jax.lax.Precision.HIGHEST)


def attention_rollout(attention_LxHxTxT: jax.Array, image_hw: Sequence[int]) -> jax.Array:
  """The rollout heat map of each image: [..., L, H, T, T] -> [..., *image_hw] in [0, 1]."""
  patch_values = cls_rollout(attention_LxHxTxT)[..., 1:]   # drop the cls column
  return resize_bilinear(min_max(token_grid(patch_values)), image_hw)
