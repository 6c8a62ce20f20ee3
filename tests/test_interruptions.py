"""A run killed with SIGKILL while orbax writes a checkpoint, restarted with the same command,
ends exactly like a run that was never interrupted."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from v1t_jax import checkpoints, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(data_dir: str, zip_dir: str, workdir: str) -> list[str]:
  """launch_train.py with conftest's one_epoch_run settings (figures aside, which change no
  number): that run is the uninterrupted reference."""
  return [sys.executable, "launch_train.py", "--config=configs/synthetic.py:tiny",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          f"--config.synthetic.zip_dir={zip_dir}", "--config.train.num_epochs=1",
          "--config.train.checkpoint_every_steps=1", "--config.train.lr_decay_epochs=1"]


def kill_during_a_checkpoint_write(cmd: list[str], checkpoints: str, after_step: int) -> str:
  """Starts the run and SIGKILLs it as soon as orbax has a temporary (unfinished) checkpoint of
  a step >= after_step on disk; returns that folder's name."""
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline:
      names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
      partial = [n for n in names if "tmp" in n and int(n.split(".")[0]) >= after_step]
      if partial:
        proc.kill()   # SIGKILL: no cleanup, no wait_until_finished
        proc.wait()
        return partial[0]
      time.sleep(0.001)
  finally:
    if proc.poll() is None:
      proc.kill()
  raise AssertionError(f"no checkpoint write in progress was seen (exit code {proc.returncode})")


def test_sigkill_during_checkpoint_write_then_resume(tiny_zips, tiny_data_dir, one_epoch_run,
                                                     tmp_path):
  workdir = str(tmp_path / "killed")
  cmd = command(tiny_data_dir, os.path.dirname(tiny_zips[0]), workdir)
  partial = kill_during_a_checkpoint_write(cmd, os.path.join(workdir, "checkpoints"),
                                           after_step=2)
  reference, config = one_epoch_run[:2]
  trainer = train.setup(config)
  latest, best = checkpoints.checkpoint_managers(workdir)
  interrupted_at = latest.latest_step()
  latest.close(), best.close()
  assert interrupted_at is not None and interrupted_at < int(partial.split(".")[0]), partial
  # The same command again: resumes from the last finished checkpoint and completes the run.
  subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

  states = []
  for run in (workdir, reference):
    latest, best = checkpoints.checkpoint_managers(run)
    assert latest.latest_step() == 3
    states.append(checkpoints.restore(latest, trainer)[0])
    latest.close(), best.close()
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  metrics = []
  for run in (workdir, reference):
    with open(os.path.join(run, "eval", "metrics.json")) as f:
      metrics.append(json.load(f))
  assert metrics[0] == metrics[1]
