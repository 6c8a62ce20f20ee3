"""One GPU session's checks for issue 16, in one command (no TensorFlow needed):

  python scripts/gpu_check.py --out /tmp/gpu_check

1. The Pallas flash kernel (compiled, not interpreted) against the plain jnp attention with the
   kernel's own dropout mask, at the model's shape (T 1654, D 155, H 4), bf16 and fp32: outputs
   and gradients, and the time of each (forward + backward).
2. The readout's sampled positions, jitted on the device at 32 x 8,000 against NumPy: the
   model's form and the broadcast-multiply-sum form that XLA:CPU miscompiles (docs/fidelity.md).
3. `python -m v1t_jax.bench` on the default config (6 mice x 16) for the explicit and the fused
   attention, bf16 and fp32, with a profile of the fused bf16 step. JSON lines go to --out.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from v1t_jax import flash_attention as fa  # noqa: E402


def timed(fn, *args, iters=10):
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def kernel_check(dtype, n=16, h=4, t=1654, d=155, rate=0.2544):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (n, h, t, d), jnp.float32).astype(dtype) for kk in keys[:3])
  seed = jax.random.bits(keys[3], (2,), jnp.uint32)
  mask = fa.keep_mask(seed, (n, h, t, t), rate)
  scale = d**-0.5

  def loss(f):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)
                                                              * jnp.sin(jnp.arange(d))),
                                      argnums=(0, 1, 2)))
  fused = loss(lambda q, k, v: fa.flash_attention(q, k, v, scale=scale, dropout_rate=rate,
                                                  seed=seed))
  plain = loss(lambda q, k, v: fa.reference_attention(q, k, v, scale=scale,
                                                      keep_mask_or_None=mask, rate=rate))
  (a, ga), (b, gb) = fused(q, k, v), plain(q, k, v)
  rel = lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))  # noqa: E731
  return {"dtype": str(jnp.dtype(dtype)), "loss_rel": rel(a, b),
          "grad_rel": max(rel(x, y) for x, y in zip(ga, gb)),
          "fused_fwd_bwd_ms": 1e3 * timed(fused, q, k, v),
          "plain_fwd_bwd_ms": 1e3 * timed(plain, q, k, v)}


def readout_check(batch=32, neurons=8000):
  """Max |jitted - NumPy| of clamp(mu + sigma z) in the model's form and in the faulty one."""
  from flax import nnx

  from v1t_jax import readout
  mouse = readout.Gaussian2d(None, np.zeros(neurons, np.float32), num_channels=4,
                             init_sigma=0.5, init_mu_range=0.5, rngs=nnx.Rngs(0))
  key = jax.random.key(1)
  z = np.asarray(jax.random.normal(key, (batch, neurons, 2)), np.float64)
  sigma, mu = np.asarray(mouse.sigma[...], np.float64), np.asarray(mouse.mu[...], np.float64)
  want = np.clip(mu + np.einsum("ncd,bnd->bnc", sigma, z), -1, 1)
  model_form = nnx.jit(lambda m, k: m.positions(batch, k))(mouse, key)
  faulty_form = jax.jit(lambda s, z, mu: jnp.clip(
      mu + jnp.sum(s[None] * z[:, :, None, :], axis=-1), -1, 1))(
      mouse.sigma[...], jnp.asarray(z, jnp.float32), mouse.mu[...])
  return {"check": "readout_positions", "batch": batch, "neurons": neurons,
          "model_form_max_err": float(np.abs(np.asarray(model_form) - want).max()),
          "faulty_form_max_err": float(np.abs(np.asarray(faulty_form) - want).max())}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="/tmp/gpu_check")
  p.add_argument("--skip_bench", action="store_true")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  print("devices:", jax.devices(), flush=True)
  with open(os.path.join(args.out, "kernel.jsonl"), "w") as f:
    for dtype in (jnp.bfloat16, jnp.float32):
      try:
        result = kernel_check(dtype)
      except Exception as e:  # noqa: BLE001  report and go on to the benchmarks
        result = {"dtype": str(jnp.dtype(dtype)), "error": f"{type(e).__name__}: {e}"[:2000]}
      print(json.dumps(result), flush=True)
      f.write(json.dumps(result) + "\n")
  try:
    result = readout_check()
  except Exception as e:  # noqa: BLE001
    result = {"check": "readout_positions", "error": f"{type(e).__name__}: {e}"[:2000]}
  print(json.dumps(result), flush=True)
  with open(os.path.join(args.out, "readout.json"), "w") as f:
    f.write(json.dumps(result) + "\n")
  if args.skip_bench:
    return
  bench = [sys.executable, "-m", "v1t_jax.bench", "--config=configs/default.py",
           "--batch_size=16", "--mice=6", "--iters=10", "--warmup=2", "--peak_gflops=989000"]
  runs = {"explicit_bf16": ["--set", "model.compute_dtype=bfloat16"],
          "fused_bf16": ["--set", "model.compute_dtype=bfloat16", "--set", "model.attention=fused",
                         "--profile_dir", os.path.join(args.out, "profile_fused_bf16")],
          "explicit_fp32": [], "fused_fp32": ["--set", "model.attention=fused"]}
  for name, extra in runs.items():
    proc = subprocess.run(bench + extra, capture_output=True, text=True)
    with open(os.path.join(args.out, f"bench_{name}.jsonl"), "w") as f:
      f.write(proc.stdout)
    print(name, proc.returncode, proc.stdout.strip()[-1500:] or proc.stderr[-1500:], flush=True)


if __name__ == "__main__":
  main()
