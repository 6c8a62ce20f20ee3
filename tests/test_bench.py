"""The model benchmark (v1t_jax.bench) and the fast paths it measures.

The fast paths (dropout masks, chunked attention with its own backward pass, the fused readout)
must equal the straightforward computations they replace: masks bit for bit, values and
gradients to float32 rounding.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v1t_jax import bench, readout, vit
from v1t_jax import model as v1t_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"what", "examples_per_s", "gflop_per_example", "gflops", "mfu", "compile_s",
        "peak_host_gib", "peak_device_gib", "device", "config", "mice", "batch_size"}


# ---------------------------------------------------------------------------------------------
# The entry point.


def test_bench_cli_on_the_tiny_config_prints_one_json_line_per_measurement():
  code = ("import runpy, sys; sys.argv = sys.argv[1:]; "
          "runpy.run_module('v1t_jax.bench', run_name='__main__'); "
          "assert not [m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets')], 'TensorFlow imported'")
  proc = subprocess.run(
      [sys.executable, "-c", code, "v1t_jax.bench", "--config=configs/synthetic.py:tiny",
       "--neurons=24,31,17", "--iters=1", "--warmup=0", "--peak_gflops=100",
       "--set", "model.attention=fused"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [r["what"] for r in lines] == ["train_step", "forward"]
  for r in lines:
    assert KEYS <= set(r), KEYS - set(r)
    assert r["examples_per_s"] > 0 and r["mice"] == 3 and r["batch_size"] == 4
    assert r["mfu"] == pytest.approx(r["gflops"] / 100)
    assert r["peak_host_gib"] > 0 and r["peak_device_gib"] is None   # CPU
    assert r["attention"] == "fused" and r["neurons"] == [24, 31, 17]
  assert lines[0]["gflop_per_example"] == pytest.approx(3 * lines[1]["gflop_per_example"])


def test_overrides_and_shorthand_flags():
  args = bench.parse_args(["--model.emb_dim=32", "--set", "train.lr=1", "--mice=2"])
  config = bench.apply_overrides(bench.load_config(args.config), args.set)
  assert config.model.emb_dim == 32 and config.train.lr == 1.0
  assert isinstance(config.train.lr, float) and args.mice == 2
  with pytest.raises(ValueError, match="unknown config field"):
    bench.apply_overrides(bench.load_config(args.config), ["model.emb_dims=3"])


@pytest.mark.parametrize("spec", ["configs/default.py", "configs/synthetic.py:tiny",
                                  "configs/synthetic.py:demo", "configs/franke.py:gray"])
def test_config_files_load_the_same_without_ml_collections(spec, monkeypatch):
  real = bench.load_config(os.path.join(ROOT, spec)).to_dict()
  saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("ml_collections", "configs")}
  monkeypatch.setitem(sys.modules, "ml_collections", None)   # `import ml_collections` fails
  try:
    stand_in = bench.load_config(os.path.join(ROOT, spec))
  finally:
    sys.modules.update(saved)
  assert isinstance(stand_in, bench._ConfigDict)
  assert stand_in.to_dict() == real


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs against XLA's count.


def test_flop_formula_matches_xla_cost_analysis_of_the_forward_pass():
  # A matmul-dominated small V1T (no attention loop at this size): XLA also counts elementwise
  # work (layer norms, softmax, GELU) that the formula leaves out, ~2 % here.
  config = v1t_model.ModelConfig(emb_dim=64, num_heads=2, num_blocks=2, mlp_dim=128,
                                 patch_size=8, patch_stride=2)
  counts, batch, hwc = (50,), 2, (36, 64, 1)
  model = v1t_model.V1T(config, neuron_counts=counts, coordinates=np.random.default_rng(0).normal(
      size=(1, 50, 3)), image_shape=hwc, rngs=nnx.Rngs(0))
  inputs = (jnp.zeros((1, batch) + hwc), jnp.zeros((1, batch, 3)), jnp.zeros((1, batch, 2)))
  forward = nnx.jit(lambda m, *x: m(*x, train=False)[0])
  compiled = forward.lower(model, *inputs).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = cost["flops"] / batch
  formula = bench.flops_per_example(config, hwc, counts, batch)
  assert formula["attention_logits"] == 2 * 2 * 2 * 436**2 * 64   # T = 15 * 29 + 1
  assert formula["total"] == pytest.approx(xla, rel=0.05)
  assert formula["total"] < xla   # the formula is the matmul part


def test_default_flops_match_the_issue_figures():
  flops = bench.flops_per_example(v1t_model.ModelConfig(), (36, 64, 1), (8372,), 16)
  assert flops["total"] / 1e9 == pytest.approx(34.3, abs=0.05)
  attention = flops["attention_logits"] + flops["attention_values"]
  assert attention / flops["total"] == pytest.approx(0.79, abs=0.01)


# ---------------------------------------------------------------------------------------------
# Fast paths equal the reference computations.


@pytest.mark.parametrize("key", [jax.random.fold_in(jax.random.key(3), 7), jax.random.PRNGKey(5)])
def test_keep_mask_is_bernoulli_bit_for_bit_whole_and_in_blocks(key):
  for shape in [(3, 5, 7), (2, 3, 13, 13), (70001,), (4, 32), (3, 64, 65)]:
    for rate in (0.2544, 0.0229, 0.5):
      expected = np.asarray(jax.random.bernoulli(key, 1.0 - rate, shape))
      np.testing.assert_array_equal(vit.keep_mask(key, 1.0 - rate, shape), expected)
  full = (6, 2, 9, 9)
  expected = np.asarray(jax.random.bernoulli(key, 0.7, full))
  block_mask = jax.jit(lambda k, b, c: vit.keep_mask(k, 0.7, (c, 2, 9, 9), full_shape=full, block=b),
                       static_argnums=2)
  for c in (1, 2, 3):
    for b in range(6 // c):
      np.testing.assert_array_equal(block_mask(key, b, c), expected[b * c:(b + 1) * c])


def test_keep_mask_blocks_past_two_to_the_32_elements():
  from jax.extend.random import threefry2x32_p
  key, length, block = jax.random.key(11), 2**17, 2**16 - 1   # a virtual 2^33-element mask
  got = vit.keep_mask(key, 0.5, (1, length), full_shape=(2**16, length), block=block)[0]
  index = block * length + np.arange(length, dtype=np.uint64)
  k1, k2 = jax.random.key_data(key)
  bits1, bits2 = threefry2x32_p.bind(k1, k2, jnp.asarray((index >> 32).astype(np.uint32)),
                                     jnp.asarray((index & 0xFFFFFFFF).astype(np.uint32)))
  uniform = np.asarray((bits1 ^ bits2) >> 9).astype(np.float64) * 2.0**-23
  np.testing.assert_array_equal(got, uniform < 0.5)


@pytest.mark.parametrize("chunk_logits, save_logits", [(10**9, 10**9), (81, 10**9), (2 * 81, 0),
                                                       (3 * 81, 0)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_attention_equals_reference_in_any_chunking(chunk_logits, save_logits, dtype,
                                                          monkeypatch):
  monkeypatch.setattr(vit, "ATTENTION_CHUNK_LOGITS", chunk_logits)
  monkeypatch.setattr(vit, "SAVE_PROBS_LOGITS", save_logits)
  attn = vit.Attention(6, 2, t_dropout=0.3, use_lsa=False, use_bias=True, fused=False,
                       compute_dtype=dtype, rngs=nnx.Rngs(0))
  t = jax.random.normal(jax.random.key(0), (6, 9, 6))   # 12 rows of 9 x 9 logits

  def fast(t, key):
    return attn(t, key=key)[0]

  def reference(t, key):   # the autodiff path on the same projections and keys
    prob_key, out_key = vit.split_key(key, 2)
    qkv = attn.to_qkv(attn.layer_norm(t))
    q, k, v = (x.reshape(6, 9, 2, 6) for x in jnp.split(qkv, 3, -1))
    out, _ = attn._reference(q, k, v, prob_key, False)
    return vit.dropout(attn.projection(out.reshape(6, 9, -1)), attn.t_dropout, out_key)

  def grad(f):
    return jax.jit(jax.grad(lambda t, key: jnp.sum(jnp.sin(f(t, key)) * jnp.arange(6.0))))

  key = jax.random.key(3)
  with jax.default_matmul_precision("float32"):
    for k in (None, key):
      np.testing.assert_array_equal(jax.jit(fast)(t, k), jax.jit(reference)(t, k))
      tolerance = 1e-6 if dtype == "float32" else 1e-3
      np.testing.assert_allclose(grad(fast)(t, k), grad(reference)(t, k), atol=tolerance)


def test_fused_readout_equals_grid_sample_then_channel_sum():
  rng = np.random.default_rng(0)
  feat = jnp.asarray(rng.normal(size=(3, 5, 7, 4)), jnp.float32)
  grid = jnp.asarray(rng.uniform(-1.3, 1.3, size=(3, 11, 2)), jnp.float32)   # some outside
  features = jnp.asarray(rng.normal(size=(11, 4)), jnp.float32)

  def reference(feat, grid, features):
    return jnp.sum(readout.bilinear_sample(feat, grid) * features, -1)

  def loss(f):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))

  got, expected = loss(readout.sample_and_weigh)(feat, grid, features), loss(reference)(
      feat, grid, features)
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
  for a, b in zip(got[1], expected[1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Under vmap over mice, as the model applies it.
  stacked = jax.vmap(readout.sample_and_weigh)(feat[None], grid[None], features[None])[0]
  np.testing.assert_allclose(stacked, reference(feat, grid, features), rtol=1e-5)
