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


def test_default_config_prints_the_original_counts():
  result = run_summary(NEURONS)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  assert json.loads(lines[0]) == {
      "core": 2_465_200, "readouts": 7_487_792, "shifters": 342, "total": 9_953_334}


def test_overrides_apply():
  """Per-mouse B-MLPs count once per mouse; no shifters. (Bad modes: test_model.py.)"""
  result = run_summary(NEURONS, "--config.model.behavior_mode=4", "--config.model.shift_mode=0")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == {
      "core": 2_716_240, "readouts": 7_487_792, "shifters": 0, "total": 10_204_032}
