"""Flash attention with in-kernel dropout (v1t_jax.flash_attention), Pallas interpret mode on CPU.

Small shapes: T = 37 (not a multiple of any block: padded keys and queries), D = 20 (padded to
32). The reference is checked once against NumPy, so the kernel is not only compared with our
own jnp code."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v1t_jax import flash_attention as fa

N, H, T, D = 2, 2, 37, 20
RATE = 0.3
SCALE = 0.4  # > D^-1/2: a peakier softmax than usual, a harder test
SEED = np.array([0x12345678, 0x9ABCDEF0], np.uint32)


def _qkv(dtype=jnp.float32, key=0):
  q, k, v = (jax.random.normal(kk, (N, H, T, D), jnp.float32).astype(dtype)
             for kk in jax.random.split(jax.random.key(key), 3))
  return q, k, v


@functools.partial(jax.jit, static_argnames=("rate", "blocks", "use_seed"))
def _flash(q, k, v, seed, rate=RATE, blocks=(16, 16, None, None), use_seed=True):
  bq, bk, bq_bwd, bk_bwd = blocks
  return fa.flash_attention(q, k, v, scale=SCALE, dropout_rate=rate,
                            seed=seed if use_seed else None, block_q=bq, block_k=bk,
                            block_q_bwd=bq_bwd, block_k_bwd=bk_bwd, interpret=True)


def _reference(q, k, v, mask, rate=RATE, scale=SCALE):
  return fa.reference_attention(q, k, v, scale=scale, keep_mask_or_None=mask, rate=rate)


def _rel_err(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.max(np.abs(x - y)) / np.max(np.abs(y))


def test_reference_matches_numpy():
  q, k, v = _qkv()
  mask = np.asarray(fa.keep_mask(SEED, (N, H, T, T), RATE))
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("nhqd,nhkd->nhqk", qn, kn) * SCALE
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = np.einsum("nhqk,nhkd->nhqd", np.where(mask, p / (1 - RATE), 0.0), vn)
  assert _rel_err(_reference(q, k, v, mask), expected) < 1e-5
  assert _rel_err(_reference(q, k, v, None), np.einsum("nhqk,nhkd->nhqd", p, vn)) < 1e-5


@pytest.mark.parametrize("dropout,blocks", [
    (True, (16, 16, None, None)), (True, (16, 32, None, None)), (True, (64, 64, None, None)),
    (False, (16, 32, None, None))])
def test_forward_matches_reference(dropout, blocks):
  q, k, v = _qkv()
  rate = RATE if dropout else 0.0
  mask = fa.keep_mask(SEED, (N, H, T, T), RATE) if dropout else None
  out = _flash(q, k, v, SEED, rate=rate, blocks=blocks)
  assert out.shape == q.shape and out.dtype == jnp.float32
  assert _rel_err(out, _reference(q, k, v, mask, rate)) < 1e-5
  if dropout:  # the mask matters: the no-dropout output is far off
    assert _rel_err(out, _reference(q, k, v, None)) > 0.1


@pytest.mark.parametrize("dropout,blocks", [
    (True, (16, 16, None, None)), (True, (32, 16, 16, 32)), (False, (16, 32, None, None))])
def test_gradients_match_reference(dropout, blocks):
  q, k, v = _qkv()
  w = jax.random.normal(jax.random.key(7), q.shape)  # a random cotangent
  rate = RATE if dropout else 0.0
  mask = fa.keep_mask(SEED, (N, H, T, T), RATE) if dropout else None
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      _flash(q, k, v, SEED, rate=rate, blocks=blocks) * w), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(lambda q, k, v: jnp.sum(
      _reference(q, k, v, mask, rate) * w), argnums=(0, 1, 2))(q, k, v)
  for name, g, e in zip("qkv", grads, expected):
    assert g.shape == e.shape and g.dtype == jnp.float32, name
    assert _rel_err(g, e) < 1e-5, name


def _corr(x, y):
  x, y = x - x.mean(), y - y.mean()
  return float((x * y).mean() / np.sqrt((x * x).mean() * (y * y).mean()))


def test_mask_statistics():
  shape, rate = (8, 4, 256, 256), 0.25
  m = np.asarray(fa.keep_mask(SEED, shape, rate))
  assert m.shape == shape and m.dtype == bool
  c = m.astype(np.float64)
  # Keep rate within 5 standard errors of 1 - rate.
  assert abs(c.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / c.size)
  # Independence: correlation of paired entries ~ 0 (standard error 1/sqrt(#pairs)).
  pairs = {"examples": (c[0::2], c[1::2]), "heads": (c[:, 0::2], c[:, 1::2]),
           "query rows": (c[:, :, :-1], c[:, :, 1:]), "key columns": (c[..., :-1], c[..., 1:]),
           "diagonal": (c[:, :, :-1, :-1], c[:, :, 1:, 1:]),
           "anti-diagonal": (c[:, :, :-1, 1:], c[:, :, 1:, :-1])}
  for name, (x, y) in pairs.items():
    assert abs(_corr(x, y)) < 5 / np.sqrt(x.size), name
  # Other seeds (each word changed by one) give uncorrelated masks; the same seed the same.
  for other in ([SEED[0] ^ 1, SEED[1]], [SEED[0], SEED[1] ^ 1]):
    m2 = np.asarray(fa.keep_mask(np.array(other, np.uint32), shape, rate))
    assert abs(_corr(c, m2.astype(np.float64))) < 5 / np.sqrt(c.size), other
  np.testing.assert_array_equal(np.asarray(fa.keep_mask(SEED, shape, rate)), m)
  # Independent of the requested sequence length (the kernel computes a padded one).
  np.testing.assert_array_equal(np.asarray(fa.keep_mask(SEED, (8, 4, 100, 60), rate)),
                                m[:, :, :100, :60])
  assert np.asarray(fa.keep_mask(SEED, (2, 2, 8, 8), 0.0)).all()


def test_bfloat16_close_to_float32():
  q, k, v = _qkv()
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out_bf16 = _flash(qb, kb, vb, SEED)
  assert out_bf16.dtype == jnp.bfloat16
  assert _rel_err(out_bf16, _flash(q, k, v, SEED)) < 3e-2
  w = jax.random.normal(jax.random.key(7), q.shape)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      _flash(q, k, v, SEED).astype(jnp.float32) * w), argnums=(0, 1, 2)))
  for name, gb, g in zip("qkv", grad(qb, kb, vb), grad(q, k, v)):
    assert gb.dtype == jnp.bfloat16, name
    assert _rel_err(gb, g) < 5e-2, name


def test_no_dropout_equals_softmax_attention():
  q, k, v = _qkv()
  to_nthd = lambda x: x.transpose(0, 2, 1, 3)
  expected = to_nthd(jax.nn.dot_product_attention(to_nthd(q), to_nthd(k), to_nthd(v),
                                                  scale=SCALE))
  for rate, use_seed in ((0.0, True), (RATE, False)):
    out = _flash(q, k, v, SEED, rate=rate, use_seed=use_seed, blocks=(16, 16, None, None))
    assert _rel_err(out, expected) < 1e-5, (rate, use_seed)


def test_per_head_scale_array():
  q, k, v = _qkv()
  scale_H = jnp.array([0.3, 0.6])
  mask = fa.keep_mask(SEED, (N, H, T, T), RATE)
  w = jax.random.normal(jax.random.key(7), q.shape)
  flash = lambda q, k, v, s: jnp.sum(w * fa.flash_attention(
      q, k, v, scale=s, dropout_rate=RATE, seed=SEED, block_q=16, block_k=16, interpret=True))
  ref = lambda q, k, v, s: jnp.sum(w * _reference(q, k, v, mask, scale=s))
  got = jax.jit(jax.value_and_grad(flash, argnums=(0, 1, 2, 3)))(q, k, v, scale_H)
  want = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(q, k, v, scale_H)
  assert _rel_err(got[0], want[0]) < 1e-5
  for name, g, e in zip(("q", "k", "v", "scale"), got[1], want[1]):
    assert _rel_err(g, e) < 1e-4, name


def test_lowers_to_triton_for_gpu():
  """The real shapes (T 1654, D 155 -> 256) lower through Pallas' Triton backend (power-of-two
  loads, supported primitives). Not compiled by Triton, not run: there is no GPU here."""
  n, h, t, d = 2, 4, 1654, 155
  spec = jax.ShapeDtypeStruct((n, h, t, d), jnp.bfloat16)
  loss = lambda q, k, v, seed: jnp.sum(fa.flash_attention(
      q, k, v, scale=d**-0.5, dropout_rate=0.1, seed=seed).astype(jnp.float32))
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
      spec, spec, spec, jax.ShapeDtypeStruct((2,), jnp.uint32)).lower(
          lowering_platforms=("cuda",))
  text = lowered.as_text()
  for kernel in ("flash_attention_fwd", "flash_attention_dkdv", "flash_attention_dq"):
    assert f'name = "{kernel}"' in text, kernel
  assert "tensor<2x4x1664x256xbf16>" in text  # T padded to the block, D to a power of two


def test_rejects_bad_arguments():
  q, k, v = _qkv()
  call = functools.partial(fa.flash_attention, q, k, v, scale=SCALE, interpret=True)
  with pytest.raises(ValueError, match="powers of two"):
    call(dropout_rate=RATE, seed=SEED, block_q=24)
  with pytest.raises(ValueError, match="dropout_rate"):
    call(dropout_rate=1.0, seed=SEED)
  with pytest.raises(ValueError, match="seed"):
    call(dropout_rate=RATE, seed=np.array([1, 2, 3], np.uint32))
