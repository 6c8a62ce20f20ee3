"""launch_train.py as users run it: synthesize on first use, train, evaluate, strict overrides."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args):
  proc = subprocess.run([sys.executable, "launch_train.py", "--config=configs/synthetic.py:tiny",
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
  return proc


def test_synthesize_convert_train_evaluate(tmp_path):
  data = [f"--config.data.data_dir={tmp_path / 'tfds'}",
          f"--config.synthetic.zip_dir={tmp_path / 'zips'}"]
  workdir = f"--workdir={tmp_path / 'run'}"
  proc = launch(workdir, "--mode=data", *data)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "synthesizing the 'tiny' preset" in proc.stdout and "converting 3 mice" in proc.stdout
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [m["neurons"] for m in summary["mice"]] == [24, 31, 17]
  assert summary["batch"]["image"] == [[3, 4, 36, 64, 1], "float32"]

  proc = launch(workdir, "--mode=train", *data)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "synthesizing" not in proc.stdout           # the data exist now
  assert "epoch 2/2" in proc.stdout
  trained = json.loads(proc.stdout.strip().splitlines()[-1])

  proc = launch(workdir, "--mode=evaluate", *data)
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
  assert evaluated["validation"] == trained["validation"]
  assert os.path.exists(tmp_path / "run" / "evaluation.json")


def test_misspelt_override_fails_loudly(tmp_path):
  proc = launch(f"--workdir={tmp_path}", "--config.train.num_epoch=3")
  assert proc.returncode != 0 and "num_epoch" in proc.stderr
