"""The model benchmark (v1t_jax.bench): its entry point, config loading and FLOP formula."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v1t_jax import bench
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
       "--set", "model.attention=fused", "--set", "model.t_dropout=0.0"],
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


def test_a_step_larger_than_host_memory_is_one_line_naming_the_flags(monkeypatch, capsys):
  monkeypatch.setattr(bench, "host_memory_gib", lambda: 1e-4)   # ~100 KiB: the tiny step exceeds it
  with pytest.raises(bench.BenchError, match=r"train_step needs .* GiB .* lower --mice or "
                                             r"--batch_size"):
    # The CLI test's settings: its step is in the compilation cache.
    bench.main(["--config=configs/synthetic.py:tiny", "--neurons=24,31,17", "--iters=1",
                "--warmup=0", "--what=train_step", "--set", "model.attention=fused",
                "--set", "model.t_dropout=0.0"])
  assert "{" not in capsys.readouterr().out   # nothing measured, nothing printed


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


@pytest.mark.parametrize("core", ["vit", "stacked2d"])
def test_flop_formula_matches_xla_cost_analysis_of_the_forward_pass(core):
  # A matmul-dominated small V1T (no attention loop at this size): XLA also counts elementwise
  # work (layer norms, softmax, GELU; BatchNorm and ELU in the CNN) that the formula leaves
  # out, ~2 % here.
  config = v1t_model.ModelConfig(emb_dim=64, num_heads=2, num_blocks=2, mlp_dim=128,
                                 patch_size=8, patch_stride=2)
  if core == "stacked2d":   # the original's CNN, 2 of its 4 layers
    config = v1t_model.ModelConfig(core="stacked2d", behavior_mode=1,
                                   stacked2d={"num_layers": 2})
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
  if core == "vit":
    assert formula["attention_logits"] == 2 * 2 * 2 * 436**2 * 64   # T = 15 * 29 + 1
  else:   # 28 x 56 outputs of a 9x9 conv over 4 channels (behaviour tiled in), 64 filters
    assert formula["conv_0"] == 2 * 28 * 56 * 4 * 81 * 64
  assert formula["total"] == pytest.approx(xla, rel=0.05)
  assert formula["total"] < xla   # the formula is the matmul part
