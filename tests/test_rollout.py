"""Attention rollout against an independent NumPy reference of model_spec.md §9.1."""

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from v1t_jax import model as v1t_model
from v1t_jax import rollout

IMAGE_HW = (36, 64)
GRID_HW = (6, 10)          # P = S = 6 on 36x64; find_shape(60) gives the same (6, 10)


def random_attention(rng, shape):
  """Softmax rows of random logits: [..., L, H, T, T], every row sums to one."""
  logits = rng.normal(scale=2.0, size=shape)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def reference_resize(x, out_hw):
  """PyTorch bilinear, align_corners=False, written per output pixel (negative sources -> 0)."""
  def source(i, n_in, n_out):
    s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(math.floor(s)), n_in - 1)
    return i0, min(i0 + 1, n_in - 1), s - i0
  h, w = x.shape
  out = np.zeros(out_hw)
  for i in range(out_hw[0]):
    y0, y1, fy = source(i, h, out_hw[0])
    for j in range(out_hw[1]):
      x0, x1, fx = source(j, w, out_hw[1])
      top = (1 - fx) * x[y0, x0] + fx * x[y0, x1]
      bottom = (1 - fx) * x[y1, x0] + fx * x[y1, x1]
      out[i, j] = (1 - fy) * top + fy * bottom
  return out


def reference_rollout(attention_LxHxTxT, grid_hw, out_hw):
  """The spec, step by step: full matrix chain, cls row, reshape, min-max, resize."""
  a = attention_LxHxTxT.astype(np.float64).max(axis=1)
  a = a + np.eye(a.shape[-1])
  a = a / a.sum(-1, keepdims=True)
  joint = a[0]
  for layer in range(1, a.shape[0]):
    joint = a[layer] @ joint
  heat = joint[0, 1:].reshape(grid_hw)
  heat = (heat - heat.min()) / (heat.max() - heat.min())
  return reference_resize(heat, out_hw)


def test_rollout_equals_numpy_reference():
  rng = np.random.default_rng(0)
  num_tokens = 1 + GRID_HW[0] * GRID_HW[1]
  attention = random_attention(rng, (2, 3, 3, 2, num_tokens, num_tokens))   # M, B, L, H, T, T
  maps = np.asarray(rollout.attention_rollout(jnp.asarray(attention), IMAGE_HW))
  assert maps.shape == (2, 3) + IMAGE_HW
  for m in range(2):
    for b in range(3):
      np.testing.assert_allclose(maps[m, b], reference_rollout(attention[m, b], GRID_HW, IMAGE_HW),
                                 atol=2e-5)
  assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_rows_sum_to_one():
  rng = np.random.default_rng(1)
  attention = random_attention(rng, (4, 2, 3, 2, 13, 13))
  augmented = rollout.add_residual(rollout.max_over_heads(jnp.asarray(attention)))
  np.testing.assert_allclose(np.asarray(augmented).sum(-1), 1.0, rtol=1e-6)
  # A product of row-stochastic matrices is row-stochastic: the cls row sums to one too.
  np.testing.assert_allclose(np.asarray(rollout.cls_rollout(jnp.asarray(attention))).sum(-1), 1.0,
                             rtol=1e-5)


def test_cls_attending_to_one_patch_lights_up_its_location():
  # Every token attends only to patch k (row 2, column 7 of the 6x10 grid): the map's peak must
  # sit over that patch's pixels (6x6 patches), which pins the row-major token layout.
  num_tokens = 1 + GRID_HW[0] * GRID_HW[1]
  k = 1 + 2 * GRID_HW[1] + 7
  attention = np.zeros((2, 1, num_tokens, num_tokens), np.float32)
  attention[..., k] = 1.0
  heat = np.asarray(rollout.attention_rollout(jnp.asarray(attention), IMAGE_HW))
  row, col = np.unravel_index(np.argmax(heat), heat.shape)
  assert 2 * 6 <= row < 3 * 6 and 7 * 6 <= col < 8 * 6
  # Upsampling 10 -> 64 columns puts no output pixel on a patch centre, so the peak is below 1.
  assert 0.8 < heat.max() <= 1.0


def test_constant_map_gives_zeros_not_nan():
  # Pure self-attention: the cls row is e_0, every patch gets 0 (the original would divide by 0).
  attention = np.broadcast_to(np.eye(61, dtype=np.float32), (2, 2, 61, 61))
  heat = np.asarray(rollout.attention_rollout(jnp.asarray(attention), IMAGE_HW))
  assert heat.shape == IMAGE_HW and np.all(heat == 0.0)


def test_rollout_of_the_models_own_attention():
  config = v1t_model.ModelConfig(patch_size=6, patch_stride=6, emb_dim=8, num_heads=2,
                                 num_blocks=2, mlp_dim=16)
  model = v1t_model.V1T(config, neuron_counts=(3, 4), coordinates=np.zeros((2, 4, 3)),
                        image_shape=IMAGE_HW + (1,), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(2, 2) + IMAGE_HW + (1,)), jnp.float32)
  forward = nnx.jit(lambda model, *x: model(*x, train=False, return_attention=True)[1])
  aux = forward(model, images, jnp.zeros((2, 2, 3)), jnp.zeros((2, 2, 2)))   # one compile
  attention = np.asarray(aux["attention"])
  assert attention.shape == (2, 2, 2, 2, 61, 61)                       # M, B, L, H, T, T
  maps = np.asarray(rollout.attention_rollout(aux["attention"], IMAGE_HW))
  assert maps.shape == (2, 2) + IMAGE_HW
  # An untrained model attends almost uniformly: the map's contrast is ~1e-4 of its level, so
  # min-max magnifies float32 rounding; the reference runs in float64.
  np.testing.assert_allclose(maps[1, 0], reference_rollout(attention[1, 0], GRID_HW, IMAGE_HW),
                             atol=5e-3)
