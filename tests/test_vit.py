"""ViT core: patch geometry, unfold + linear against NumPy, the core against a NumPy
implementation of model_spec.md §3 (evaluation and training mode), remat policies, init, parameter
counts."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v1t_jax import layers, vit


def tiny_core(**overrides):
  kwargs = dict(
      patch_size=4, patch_stride=4, patch_mode=0, emb_dim=8, num_heads=2, num_blocks=2,
      mlp_dim=16, p_dropout=0.1, t_dropout=0.1, drop_path=0.0, use_lsa=False,
      disable_bias=False, behavior_dim=5, bmlp_mice=None, attention="explicit",
      compute_dtype="float32")
  kwargs.update(overrides)
  return vit.ViTCore((12, 16, 1), rngs=nnx.Rngs(0), **kwargs)


def default_core(behavior_dim=5, bmlp_mice=None, channels=1):
  """The default V1T core (model_spec.md §12), abstract: shapes only."""
  return nnx.eval_shape(lambda: vit.ViTCore(
      (36, 64, channels), patch_size=8, patch_stride=1, patch_mode=0, emb_dim=155, num_heads=4,
      num_blocks=4, mlp_dim=488, p_dropout=0.0229, t_dropout=0.2544, drop_path=0.0,
      use_lsa=False, disable_bias=False, behavior_dim=behavior_dim, bmlp_mice=bmlp_mice,
      attention="explicit", compute_dtype="float32", rngs=nnx.Rngs(0)))


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


def numpy_unfold(images_NxHxWxC, patch, stride):
  """torch Unfold, one patch at a time: [N, rows*cols] patches (row-major), each the vector
  c*P*P + ki*P + kj (channel-major, §3.1)."""
  n, height, width, _ = images_NxHxWxC.shape
  rows, cols = (height - patch) // stride + 1, (width - patch) // stride + 1
  return np.stack([
      images_NxHxWxC[:, r * stride:r * stride + patch, c * stride:c * stride + patch, :]
      .transpose(0, 3, 1, 2).reshape(n, -1)
      for r in range(rows) for c in range(cols)], axis=1)


@pytest.mark.parametrize("stride", [1, 3])
def test_patch_mode_0_equals_numpy_unfold_then_linear(stride):
  """§3.1 patch_mode 0: torch Unfold (patch vector index c*P*P + ki*P + kj, patches row-major)
  then Linear, in NumPy, one patch at a time; the model computes it as one convolution."""
  size, channels, emb = 4, 2, 5
  embed = vit.PatchEmbedding((12, 17, channels), patch_mode=0, patch_size=size,
                             patch_stride=stride, emb_dim=emb, p_dropout=0.0,
                             compute_dtype="float32", rngs=nnx.Rngs(0))
  images = np.random.default_rng(1).normal(size=(3, 12, 17, channels))
  tokens = (numpy_unfold(images, size, stride) @ np.asarray(embed.projection.kernel[...])
            + np.asarray(embed.projection.bias[...]))
  cls = np.broadcast_to(np.asarray(embed.cls_token[...]), (3, 1, emb))
  expected = np.concatenate([cls, tokens], axis=1) + np.asarray(embed.pos_embedding[...])
  with jax.default_matmul_precision("float32"):
    actual = embed(jnp.asarray(images, jnp.float32), key=None)
  np.testing.assert_allclose(actual, expected, atol=1e-5)


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


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


_erf = np.vectorize(math.erf)


def numpy_core(p, images, behavior, masks, *, heads, patch, lsa_scales=None, rate=0.0,
               path_rate=0.0):
  """model_spec.md §3 in NumPy (float64), one head and one patch at a time.

  p: the core's parameters as nested dicts of arrays. masks: the training-mode keep masks in the
  order the spec applies them (embedding; per block: attention probabilities, attention output,
  drop path, MLP hidden, MLP output, drop path), or None for evaluation.
  """
  take = (lambda shape: masks.pop(0)) if masks is not None else None

  def drop(x, r):
    if take is None or r == 0.0:
      return x
    keep = take(x.shape)
    assert keep.shape == x.shape, (keep.shape, x.shape)
    return np.where(keep, x / (1.0 - r), 0.0)

  def drop_path(x):
    if take is None or path_rate == 0.0:
      return x
    keep = take(None).reshape(-1, 1, 1)
    return np.where(keep, x / (1.0 - path_rate), 0.0)

  n = images.shape[0]
  emb = p["patch_embedding"]
  tokens = numpy_unfold(images, patch, patch) @ emb["projection"]["kernel"] \
      + emb["projection"]["bias"]
  t = np.concatenate([np.broadcast_to(emb["cls_token"], (n, 1, tokens.shape[-1])), tokens], 1)
  t = drop(t + emb["pos_embedding"], rate)
  dim = t.shape[-1]
  all_probs = []
  for b, block in sorted(p["blocks"].items()):
    bm = block["bmlp"]
    t = t + np.tanh(np.tanh(behavior @ bm["fc1"]["kernel"] + bm["fc1"]["bias"])
                    @ bm["fc2"]["kernel"] + bm["fc2"]["bias"])[:, None, :]
    a = block["mha"]
    qkv = _layer_norm(t, a["layer_norm"]["scale"], a["layer_norm"]["bias"]) @ a["to_qkv"]["kernel"]
    q_all, k_all, v_all = np.split(qkv, 3, -1)
    probs = []
    for h in range(heads):
      q, k = (x[..., h * dim:(h + 1) * dim] for x in (q_all, k_all))
      logits = q @ np.swapaxes(k, -1, -2) * (dim**-0.5 if lsa_scales is None else lsa_scales[b][h])
      if lsa_scales is not None:
        logits = np.where(np.eye(t.shape[1], dtype=bool), -np.finfo(np.float32).max, logits)
      e = np.exp(logits - logits.max(-1, keepdims=True))
      probs.append(e / e.sum(-1, keepdims=True))
    probs = np.stack(probs, 1)  # [N, H, T, T]
    all_probs.append(probs)
    dropped = drop(probs, rate)
    o = np.concatenate([dropped[:, h] @ v_all[..., h * dim:(h + 1) * dim]
                        for h in range(heads)], -1)
    t = t + drop_path(drop(o @ a["projection"]["kernel"] + a["projection"]["bias"], rate))
    m = block["mlp"]
    hidden = _layer_norm(t, m["layer_norm"]["scale"], m["layer_norm"]["bias"])
    hidden = hidden @ m["fc1"]["kernel"] + m["fc1"]["bias"]
    hidden = drop(0.5 * hidden * (1.0 + _erf(hidden / np.sqrt(2.0))), rate)
    t = t + drop_path(drop(hidden @ m["fc2"]["kernel"] + m["fc2"]["bias"], rate))
  assert masks is None or not masks, f"{len(masks)} masks left unused"
  h, w = vit.find_shape(t.shape[1] - 1)
  return t[:, 1:].reshape(n, h, w, dim), np.stack(all_probs, 1)


def core_params(core):
  state = nnx.state(core, nnx.Param)
  return jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(state))


@pytest.fixture
def recorded_masks(monkeypatch):
  """Every keep mask jax.random.bernoulli draws (eagerly), in the order they are drawn."""
  masks, draw = [], jax.random.bernoulli

  def recording(key, p, shape):
    keep = draw(key, p, shape)
    masks.append(np.asarray(keep))
    return keep

  monkeypatch.setattr(jax.random, "bernoulli", recording)
  return masks


@pytest.mark.parametrize("use_lsa", [False, True])
def test_core_equals_numpy_spec_in_evaluation(use_lsa):
  core = tiny_core(use_lsa=use_lsa)
  lsa = None
  if use_lsa:
    lsa = {}
    for b, block in enumerate(core.blocks):
      np.testing.assert_allclose(block.mha.scale[...], 8**-0.5)
      block.mha.scale[...] = lsa[b] = np.array([0.3, 0.9], np.float32) * (b + 1)
  rng = np.random.default_rng(0)
  for block in core.blocks:  # non-trivial LayerNorm affine and biases
    block.mha.layer_norm.scale[...] = rng.normal(size=8).astype(np.float32)
    block.mha.projection.bias[...] = rng.normal(size=8).astype(np.float32)
  images = rng.normal(size=(1, 3, 12, 16, 1)).astype(np.float32)
  behavior = rng.normal(size=(1, 3, 5)).astype(np.float32)
  with jax.default_matmul_precision("float32"):
    feat, extras = core(jnp.asarray(images), jnp.asarray(behavior), train=False, key=None,
                        return_attention=True)
  probs = extras["attention"]
  expected, expected_probs = numpy_core(core_params(core), images[0], behavior[0], None,
                                        heads=2, patch=4, lsa_scales=lsa)
  np.testing.assert_allclose(feat[0], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(probs[0], expected_probs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path_rate", [0.0, 0.4])
def test_core_equals_numpy_spec_in_training_given_the_masks(recorded_masks, path_rate):
  """Dropout positions and scaling (embedding, probabilities, attention output, MLP hidden and
  output) and drop path, with the masks the core drew fed to the NumPy spec in the spec's order."""
  core = tiny_core(p_dropout=0.3, t_dropout=0.3, drop_path=path_rate)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(1, 4, 12, 16, 1)).astype(np.float32)
  behavior = rng.normal(size=(1, 4, 5)).astype(np.float32)
  with jax.default_matmul_precision("float32"):
    feat, _ = core(jnp.asarray(images), jnp.asarray(behavior), train=True, key=jax.random.key(3))
  # The embedding mask uses p_dropout, the rest t_dropout: give them equal rates here.
  masks = list(recorded_masks)
  assert len(masks) == 1 + 2 * (4 + 2 * (path_rate > 0))
  expected, _ = numpy_core(core_params(core), images[0], behavior[0], masks, heads=2, patch=4,
                           rate=0.3, path_rate=path_rate)
  np.testing.assert_allclose(feat[0], expected, rtol=1e-4, atol=1e-5)
  evaluation, _ = numpy_core(core_params(core), images[0], behavior[0], None, heads=2, patch=4)
  assert not np.allclose(feat[0], evaluation, atol=1e-3)  # the masks mattered


def test_dropout_masks_are_independent_per_example_and_head(recorded_masks):
  """PyTorch semantics: no mask is shared (broadcast) across examples or heads."""
  attn = vit.Attention(8, 2, t_dropout=0.5, use_lsa=False, use_bias=True, fused=False,
                       compute_dtype="float32", rngs=nnx.Rngs(0))
  attn(jax.random.normal(jax.random.key(0), (6, 9, 8)), keys=jax.random.split(jax.random.key(1)))
  probs_mask = recorded_masks[0]
  assert probs_mask.shape == (6, 2, 9, 9)
  flat = probs_mask.reshape(12, -1)
  assert len({row.tobytes() for row in flat}) == 12
  assert 0.4 < probs_mask.mean() < 0.6


def test_remat_policies_change_memory_not_results():
  """Same values and gradients under every train.remat policy; what autodiff keeps between the
  forward and the backward pass (the VJP's residuals) shrinks from none to attention to block."""
  images = jax.random.normal(jax.random.key(0), (1, 6, 12, 16, 1))
  behavior = jax.random.normal(jax.random.key(1), (1, 6, 5))
  results, saved_bytes = {}, {}
  for remat in vit.REMAT_POLICIES:
    graphdef, params, rest = nnx.split(tiny_core(remat=remat, patch_stride=2), nnx.Param, ...)

    def loss(params, graphdef=graphdef, rest=rest):
      feat, _ = nnx.merge(graphdef, params, rest)(images, behavior, train=True,
                                                  key=jax.random.key(2))
      return jnp.sum(feat**2)

    results[remat] = jax.jit(jax.value_and_grad(loss))(params)
    residuals = jax.eval_shape(lambda p, loss=loss: jax.vjp(loss, p)[1], params)
    saved_bytes[remat] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))
  for remat in ("attention", "block"):
    chex.assert_trees_all_close(results[remat], results["none"], rtol=1e-5, atol=1e-6)
  assert saved_bytes["block"] < saved_bytes["attention"] < saved_bytes["none"], saved_bytes


def test_fused_attention_equals_explicit_without_dropout_and_refuses_dropout_off_gpu():
  kwargs = dict(t_dropout=0.5, use_lsa=False, use_bias=True, compute_dtype="float32")
  fused = vit.Attention(6, 2, fused=True, rngs=nnx.Rngs(0), **kwargs)
  explicit = vit.Attention(6, 2, fused=False, rngs=nnx.Rngs(0), **kwargs)
  t = jax.random.normal(jax.random.key(0), (2, 5, 6))
  with jax.default_matmul_precision("float32"):
    np.testing.assert_allclose(fused(t, keys=None)[0], explicit(t, keys=None)[0], rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ValueError, match="needs the Pallas GPU kernel.*model.attention='explicit'"):
    fused(t, keys=jax.random.split(jax.random.key(1)))


def test_attention_probabilities_and_lsa_diagonal():
  attn = vit.Attention(6, 2, t_dropout=0.0, use_lsa=True, use_bias=True, fused=True,
                       compute_dtype="float32", rngs=nnx.Rngs(0))
  t = jax.random.normal(jax.random.key(0), (2, 5, 6))
  _, probs = attn(t, keys=None, return_attention=True)  # fused falls back to give probs
  assert probs.shape == (2, 2, 5, 5)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.diagonal(probs, axis1=-2, axis2=-1), 0.0)


def test_dropout_and_drop_path():
  x = jnp.ones((64, 4, 8))
  assert layers.dropout(x, 0.5, None) is x
  y = np.asarray(layers.dropout(x, 0.25, jax.random.key(0)))
  assert set(np.unique(y)) == {0.0, np.float32(1.0 / 0.75)}
  z = np.asarray(layers.drop_path(x, 0.5, jax.random.key(0)))
  per_sample = z.reshape(64, -1)
  assert np.all((per_sample == 0.0).all(1) | (per_sample == 2.0).all(1))  # whole samples
  assert 0 < (per_sample == 0.0).all(1).sum() < 64


def test_core_shapes_batch_order_and_train_randomness():
  core = tiny_core()
  def call(core, images, behavior, key):
    feat, extras = core(images, behavior, train=key is not None, key=key,
                        return_attention=key is None)
    return feat, extras.get("attention")
  run = nnx.jit(call)
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
  bmlps = layers.stack_per_mouse(make, 3, nnx.Rngs(0))
  behavior = jax.random.normal(jax.random.key(0), (3, 4, 5))
  stacked = layers.apply_per_mouse(bmlps, behavior)
  graphdef, state = nnx.split(bmlps)
  for m in range(3):
    mouse = nnx.merge(graphdef, jax.tree.map(lambda x: x[m], state))
    np.testing.assert_allclose(stacked[m], mouse(behavior[m]), rtol=1e-6)
  assert not np.allclose(state["fc1"]["kernel"][...][0], state["fc1"]["kernel"][...][1])


def test_default_core_parameter_counts_by_part():
  """model_spec.md §10.1, the original's counts of the embedding, a block and its B-MLP."""
  core = default_core()
  embed = core.patch_embedding
  assert embed.pos_embedding.shape == (1654, 155)  # 256,370
  assert num_params(embed) == 256_370 + 10_075 + 155
  assert num_params(core.blocks[0].bmlp) == 12_552
  assert num_params(core.blocks[0]) == 537_098 + 12_552
  assert num_params(core) == 2_465_200   # every behaviour mode's totals: test_model.py
  assert core.output_shape == (29, 57, 155)


def test_fused_training_path_equals_explicit_path_given_the_kernels_mask(monkeypatch):
  """vit.Attention with attention="fused" while dropping out (the Pallas kernel, here in
  interpret mode as if on a GPU) equals the explicit path fed the kernel's own keep mask:
  outputs and gradients."""
  import functools

  from v1t_jax import flash_attention
  kwargs = dict(t_dropout=0.3, use_lsa=False, use_bias=True, compute_dtype="float32")
  fused = vit.Attention(6, 2, fused=True, rngs=nnx.Rngs(0), **kwargs)
  explicit = vit.Attention(6, 2, fused=False, rngs=nnx.Rngs(0), **kwargs)
  t = jax.random.normal(jax.random.key(0), (2, 21, 6))
  keys = tuple(jax.random.split(jax.random.key(1)))   # (probabilities, output)
  prob_key = keys[0]
  seed = jax.random.bits(prob_key, (2,), jnp.uint32)
  kernel_mask = flash_attention.keep_mask(seed, (2, 2, 21, 21), 0.3)
  draw = jax.random.bernoulli

  def bernoulli(key, p, shape):   # the probabilities' mask: the kernel's bits
    return kernel_mask if tuple(shape) == kernel_mask.shape else draw(key, p, shape)

  def loss(attn, t):
    return jnp.sum(jnp.sin(attn(t, keys=keys)[0]) * jnp.arange(6.0))

  monkeypatch.setattr(jax.random, "bernoulli", bernoulli)
  with jax.default_matmul_precision("float32"):
    expected = nnx.jit(nnx.value_and_grad(loss, argnums=1))(explicit, t)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(flash_attention, "flash_attention",
                        functools.partial(flash_attention.flash_attention, interpret=True,
                                          block_q=16, block_k=16))
    got = nnx.jit(nnx.value_and_grad(loss, argnums=1))(fused, t)
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-6)
