"""Multi-process training through jax.distributed: 2 processes x 2 CPU devices on localhost.

The processes run the real entry point (`launch_train.py --coordinator_address ...`); the test
process (4 fake devices) reproduces their steps with one process and restores their checkpoint.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np

from configs import synthetic
from v1t_jax import checkpoints, input_pipeline, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tiny_config(data_dir):
  config = synthetic.get_config("tiny")
  config.data.data_dir = data_dir
  config.train.num_epochs = 1     # 3 steps of [3 mice, 4] (2 rows per process)
  return config


def run_two_processes(data_dir: str, workdir: str) -> list[str]:
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
      [sys.executable, "launch_train.py", "--config=configs/synthetic.py:tiny",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
       "--config.train.num_epochs=1", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
  return outs


def test_two_processes_train_like_one(tiny_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  outs = run_two_processes(tiny_data_dir, workdir)
  assert "2 processes (explicit), 4 devices" in outs[0]
  assert "epoch 1/1" in outs[0] and "epoch 1/1" not in outs[1]   # process 0 logs alone
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    two_process_metrics = json.load(f)

  # One process, 4 devices, fed the same global batches (both processes' rows, in order).
  config = tiny_config(tiny_data_dir)
  trainer = train.setup(config)
  assert jax.process_count() == 1 and trainer.mesh.devices.size == 4
  iters = [iter(input_pipeline.as_numpy(input_pipeline.train_dataset(
      trainer.mice, config.data, process_index=p, process_count=2))) for p in range(2)]
  state = trainer.init_state(config.seed)
  key = jax.random.key(config.seed)
  losses = []
  for step in range(3):
    parts = [next(it) for it in iters]
    batch = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}
    state, out = trainer.train_step(state, trainer.device_batch(batch),
                                    jax.random.fold_in(key, step), 1.0)
    losses.append(float(out["loss"]))
  assert all(np.isfinite(losses))

  # Their checkpoint restores in one process and holds the same parameters.
  latest, best = checkpoints.checkpoint_managers(workdir)
  assert latest.latest_step() == 3
  restored, meta = checkpoints.restore(latest, trainer)
  latest.close(), best.close()
  assert meta["epoch"] == 1
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)

  # Evaluating it in one process reproduces the metrics the two processes wrote: every
  # validation and test trial was counted once (the tier slices partition each tier).
  shutil.copytree(workdir, str(tmp_path / "copy"))
  again = train.evaluate_checkpoint(config, str(tmp_path / "copy"))
  for tier in ("validation", "test"):
    for mouse, values in two_process_metrics[tier].items():
      for name, value in values.items():
        other = again["metrics"][tier][mouse][name]
        if value is None:
          assert other is None
        else:
          np.testing.assert_allclose(value, other, rtol=1e-5, err_msg=f"{tier} {mouse} {name}")
