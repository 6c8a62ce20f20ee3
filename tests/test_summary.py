"""The parameter-count CLI, run as users run it (config overrides are read from sys.argv)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEURONS = "--neurons=7538,8372,7344,7334,8107,8098"


def run_summary(*args):
  return subprocess.run(
      [sys.executable, "-m", "v1t_jax.summary", "--config=configs/default.py", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_prints_one_json_line_with_overrides_applied():
  """Per-mouse B-MLPs count once per mouse; no shifters. (Every mode's counts: test_model.py.)"""
  result = run_summary(NEURONS, "--config.model.behavior_mode=4", "--config.model.shift_mode=0")
  assert result.returncode == 0, result.stderr
  assert len(result.stdout.strip().splitlines()) == 1
  assert json.loads(result.stdout) == {
      "core": 2_716_240, "readouts": 7_487_792, "shifters": 0, "total": 10_204_032}
