"""ViT core: patch geometry, unfold order vs conv, attention maths, init, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v1t_jax import vit




def tiny_core(**overrides):
  kwargs = dict(
      patch_size=4, patch_stride=4, patch_mode=0, emb_dim=8, num_heads=2, num_blocks=2,
      mlp_dim=16, p_dropout=0.1, t_dropout=0.1, drop_path=0.0, use_lsa=False,
      disable_bias=False, behavior_dim=5, bmlp_mice=None, attention="reference",
      compute_dtype="float32")
  kwargs.update(overrides)
  return vit.ViTCore((12, 16, 1), rngs=nnx.Rngs(0), **kwargs)


def default_core(behavior_dim=5, bmlp_mice=None, channels=1):
  """The default V1T core (model_spec.md §12), abstract: shapes only."""
  return nnx.eval_shape(lambda: vit.ViTCore(
      (36, 64, channels), patch_size=8, patch_stride=1, patch_mode=0, emb_dim=155, num_heads=4,
      num_blocks=4, mlp_dim=488, p_dropout=0.0229, t_dropout=0.2544, drop_path=0.0,
      use_lsa=False, disable_bias=False, behavior_dim=behavior_dim, bmlp_mice=bmlp_mice,
      attention="reference", compute_dtype="float32", rngs=nnx.Rngs(0)))


def num_params(module):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_find_shape_reproduces_original_including_its_disagreement():
  assert vit.find_shape(1653) == (29, 57) == vit.patch_grid((36, 64), 8, 1)
  for patch, stride in [(4, 1), (8, 2), (6, 1), (4, 2)]:  # pairs where the two agree (§3.3)
    grid = vit.patch_grid((36, 64), patch, stride)
    assert vit.find_shape(grid[0] * grid[1]) == grid
  assert vit.patch_grid((36, 64), 8, 4) == (8, 15)
  assert vit.find_shape(120) == (10, 12)  # the original's layout, not the true 8x15 grid
  assert vit.find_shape(7) == (1, 7)


def test_unfold_is_channel_major_and_row_major_over_positions():
  images = np.random.default_rng(0).normal(size=(2, 9, 11, 3)).astype(np.float32)
  size, stride = 3, 2
  patches = np.asarray(vit.unfold_patches(jnp.asarray(images), size, stride))
  rows, cols = vit.patch_grid((9, 11), size, stride)
  assert patches.shape == (2, rows * cols, 3 * size * size)
  for r, c, ch, ki, kj in [(0, 0, 0, 0, 0), (3, 4, 2, 2, 1), (1, 2, 1, 0, 2)]:
    np.testing.assert_array_equal(
        patches[:, r * cols + c, ch * size * size + ki * size + kj],
        images[:, r * stride + ki, c * stride + kj, ch])


@pytest.mark.parametrize("stride", [1, 3])
def test_unfold_linear_equals_conv_with_documented_mapping(stride):
  """patch_mode 0 == patch_mode 1 when K[ki, kj, c, d] = W[c*P*P + ki*P + kj, d]."""
  size, channels, emb = 4, 2, 5
  kwargs = dict(patch_size=size, patch_stride=stride, emb_dim=emb, p_dropout=0.0,
                compute_dtype="float32", rngs=nnx.Rngs(0))
  linear = vit.PatchEmbedding((12, 16, channels), patch_mode=0, **kwargs)
  conv = vit.PatchEmbedding((12, 16, channels), patch_mode=1, **kwargs)
  weight = linear.projection.kernel[...]  # [C*P*P, D]
  conv.projection.kernel[...] = weight.reshape(channels, size, size, emb).transpose(1, 2, 0, 3)
  conv.projection.bias[...] = linear.projection.bias[...]
  conv.cls_token[...] = linear.cls_token[...]
  conv.pos_embedding[...] = linear.pos_embedding[...]
  images = jax.random.normal(jax.random.key(1), (3, 12, 16, channels))
  with jax.default_matmul_precision("float32"):
    np.testing.assert_allclose(linear(images, key=None), conv(images, key=None), atol=1e-5)


def test_patch_embedding_init():
  embed = vit.PatchEmbedding((36, 64, 1), patch_size=8, patch_stride=1, patch_mode=0,
                             emb_dim=155, p_dropout=0.0, compute_dtype="float32",
                             rngs=nnx.Rngs(0))
  kernel = np.asarray(embed.projection.kernel[...])
  assert np.abs(kernel).max() <= 0.125 and np.abs(kernel).max() > 0.124  # U(±1/sqrt(64))
  assert np.abs(embed.projection.bias[...]).max() <= 0.125
  assert embed.pos_embedding.shape == (1654, 155)
  assert abs(float(np.std(embed.pos_embedding[...])) - 1.0) < 0.01  # N(0, 1), not 0.02
  assert embed.cls_token.shape == (1, 1, 155)


def test_transformer_init():
  block = tiny_core().blocks[0]
  assert abs(float(np.std(block.mha.to_qkv.kernel[...])) - 0.02) < 0.003
  assert abs(float(np.std(block.mlp.fc1.kernel[...])) - 0.02) < 0.005
  assert block.mha.to_qkv.bias is None
  for layer in (block.mha.projection, block.mlp.fc2, block.bmlp.fc1):
    np.testing.assert_array_equal(layer.bias[...], 0.0)
  np.testing.assert_array_equal(block.mlp.layer_norm.scale[...], 1.0)
  np.testing.assert_array_equal(block.mlp.layer_norm.bias[...], 0.0)
  assert block.mlp.layer_norm.epsilon == 1e-5


def numpy_attention(t, ln_scale, ln_bias, w_qkv, w_out, b_out, heads, lsa_scale=None):
  """model_spec.md §3.2 written out per head: head width D, head-major (h d) layout."""
  mean = t.mean(-1, keepdims=True)
  var = ((t - mean) ** 2).mean(-1, keepdims=True)
  u = (t - mean) / np.sqrt(var + 1e-5) * ln_scale + ln_bias
  qkv = u @ w_qkv
  dim = t.shape[-1]
  inner = heads * dim
  outs = []
  for h in range(heads):
    q, k, v = (qkv[..., j * inner + h * dim: j * inner + (h + 1) * dim] for j in range(3))
    logits = q @ np.swapaxes(k, -1, -2)
    logits = logits * (dim ** -0.5 if lsa_scale is None else lsa_scale[h])
    if lsa_scale is not None:
      logits = np.where(np.eye(t.shape[1], dtype=bool), -np.finfo(np.float32).max, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    outs.append(probs / probs.sum(-1, keepdims=True) @ v)
  return np.concatenate(outs, -1) @ w_out + b_out


@pytest.mark.parametrize("use_lsa", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_attention_matches_numpy_reference(use_lsa, fused):
  dim, heads = 6, 3
  attn = vit.Attention(dim, heads, t_dropout=0.5, use_lsa=use_lsa, use_bias=True, fused=fused,
                       compute_dtype="float32", rngs=nnx.Rngs(2))
  rng = np.random.default_rng(0)
  attn.layer_norm.scale[...] = rng.normal(size=dim).astype(np.float32)
  attn.projection.bias[...] = rng.normal(size=dim).astype(np.float32)
  lsa_scale = None
  if use_lsa:
    np.testing.assert_allclose(attn.scale[...], dim ** -0.5)
    attn.scale[...] = lsa_scale = np.array([0.3, 0.5, 0.9], np.float32)
  t = rng.normal(size=(2, 5, dim)).astype(np.float32)
  with jax.default_matmul_precision("float32"):
    out, probs = attn(jnp.asarray(t), key=None, return_attention=False)
    expected = numpy_attention(
        t, np.asarray(attn.layer_norm.scale[...]), np.asarray(attn.layer_norm.bias[...]),
        np.asarray(attn.to_qkv.kernel[...]), np.asarray(attn.projection.kernel[...]),
        np.asarray(attn.projection.bias[...]), heads, lsa_scale)
  assert probs is None
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_fused_attention_falls_back_when_probabilities_drop_out():
  kwargs = dict(t_dropout=0.5, use_lsa=False, use_bias=True, compute_dtype="float32")
  fused = vit.Attention(6, 2, fused=True, rngs=nnx.Rngs(0), **kwargs)
  reference = vit.Attention(6, 2, fused=False, rngs=nnx.Rngs(0), **kwargs)
  t = jax.random.normal(jax.random.key(0), (2, 5, 6))
  key = jax.random.key(1)
  np.testing.assert_array_equal(fused(t, key=key)[0], reference(t, key=key)[0])


def test_attention_probabilities_and_lsa_diagonal():
  attn = vit.Attention(6, 2, t_dropout=0.0, use_lsa=True, use_bias=True, fused=True,
                       compute_dtype="float32", rngs=nnx.Rngs(0))
  t = jax.random.normal(jax.random.key(0), (2, 5, 6))
  _, probs = attn(t, key=None, return_attention=True)  # fused falls back to give probs
  assert probs.shape == (2, 2, 5, 5)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.diagonal(probs, axis1=-2, axis2=-1), 0.0)


def test_dropout_and_drop_path():
  x = jnp.ones((64, 4, 8))
  assert vit.dropout(x, 0.5, None) is x
  y = np.asarray(vit.dropout(x, 0.25, jax.random.key(0)))
  assert set(np.unique(y)) == {0.0, np.float32(1.0 / 0.75)}
  z = np.asarray(vit.drop_path(x, 0.5, jax.random.key(0)))
  per_sample = z.reshape(64, -1)
  assert np.all((per_sample == 0.0).all(1) | (per_sample == 2.0).all(1))  # whole samples
  assert 0 < (per_sample == 0.0).all(1).sum() < 64


def test_core_shapes_batch_order_and_train_randomness():
  core = tiny_core()
  run = nnx.jit(lambda core, images, behavior, key: core(images, behavior, key=key,
                                                          return_attention=key is None))
  images = jax.random.normal(jax.random.key(0), (2, 3, 12, 16, 1))
  behavior = jax.random.normal(jax.random.key(1), (2, 3, 5))
  feat, probs = run(core, images, behavior, None)
  # 3x4 patch grid, but find_shape(12) = (4, 3): the original's layout, channels-last.
  assert feat.shape == (2, 3, 4, 3, 8)
  assert probs.shape == (2, 3, 2, 2, 13, 13)
  # The merged [M*B] axis is split back in order: reversing mice and trials reverses the maps.
  flipped, _ = run(core, images[::-1, ::-1], behavior[::-1, ::-1], None)
  np.testing.assert_allclose(flipped[::-1, ::-1], feat, rtol=1e-5, atol=1e-6)
  train1, _ = run(core, images, behavior, jax.random.key(5))
  train2, _ = run(core, images, behavior, jax.random.key(5))
  train3, _ = run(core, images, behavior, jax.random.key(6))
  np.testing.assert_array_equal(train1, train2)
  assert not np.allclose(train1, train3)


def test_per_mouse_bmlp_equals_loop_over_mice():
  make = lambda *, rngs: vit.BehaviorMLP(5, 8, use_bias=True, compute_dtype="float32", rngs=rngs)
  bmlps = vit.stack_per_mouse(make, 3, nnx.Rngs(0))
  behavior = jax.random.normal(jax.random.key(0), (3, 4, 5))
  stacked = vit.apply_per_mouse(bmlps, behavior)
  graphdef, state = nnx.split(bmlps)
  for m in range(3):
    mouse = nnx.merge(graphdef, jax.tree.map(lambda x: x[m], state))
    np.testing.assert_allclose(stacked[m], mouse(behavior[m]), rtol=1e-6)
  assert not np.allclose(state["fc1"]["kernel"][...][0], state["fc1"]["kernel"][...][1])


def test_default_core_parameter_counts():
  """model_spec.md §10.1, the original's counts."""
  core = default_core()
  embed = core.patch_embedding
  assert embed.pos_embedding.shape == (1654, 155)  # 256,370
  assert num_params(embed) == 256_370 + 10_075 + 155
  assert num_params(core.blocks[0].bmlp) == 12_552
  assert num_params(core.blocks[0]) == 537_098 + 12_552
  assert num_params(core) == 2_465_200
  assert core.output_shape == (29, 57, 155)
  assert num_params(default_core(behavior_dim=0)) == 2_414_992
  assert num_params(default_core(behavior_dim=0, channels=4)) == 2_444_752
  assert num_params(default_core(behavior_dim=3)) == 2_464_584
  assert num_params(default_core(bmlp_mice=6)) == 2_716_240
