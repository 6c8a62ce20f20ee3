"""launch_train.py as users run it: synthesize on first use, train, evaluate, strict overrides."""

import json
import os
import subprocess
import sys

import pytest

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

  # An empty compilation cache of its own: the evaluation step is compiled and stored there.
  cache = tmp_path / "xla_cache"
  proc = launch(workdir, "--mode=evaluate", f"--compilation_cache={cache}", *data)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [p for p in os.listdir(cache) if p.startswith("jit_eval_step-")]
  evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
  assert evaluated["validation"] == trained["validation"]
  assert os.path.exists(tmp_path / "run" / "evaluation.json")


def test_misspelt_override_fails_loudly(tmp_path):
  proc = launch(f"--workdir={tmp_path}", "--config.train.num_epoch=3")
  assert proc.returncode != 0 and "num_epoch" in proc.stderr



def _synthetic_config(data_dir, zip_dir):
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.data_dir, config.synthetic.zip_dir = str(data_dir), str(zip_dir)
  return config


def test_ensure_dataset_finishes_a_killed_conversion(tiny_zips, tmp_path, capsys):
  from data_prep import convert, prepare
  zip_dir = os.path.dirname(tiny_zips[0])
  convert.convert(tiny_zips[:1], str(tmp_path))   # as if killed after the first of 3 mice
  capsys.readouterr()
  mice = prepare.ensure_dataset(_synthetic_config(tmp_path, zip_dir))
  assert [m.data_key for m in mice] == ["90001-1-1", "90002-2-3", "90003-4-5"]
  out = capsys.readouterr().out
  assert "synthesizing" not in out   # the zips were there
  assert (f"converting 2 mice into {tmp_path} (missing: 90002-2-3, 90003-4-5; already there: "
          "90001-1-1)") in out
  assert "3 mice found" not in out and "2 mice found: 2 converted, 0 skipped" in out


def test_ensure_dataset_synthesizes_missing_zips(tiny_zips, tmp_path, monkeypatch):
  import shutil

  from data_prep import prepare, synthesize
  zip_dir = tmp_path / "zips"
  zip_dir.mkdir()
  shutil.copy(tiny_zips[0], zip_dir)   # one zip of three: the others must be synthesized
  calls = []

  def fake_synthesize(out, preset, seed, workers, color):
    calls.append((out, preset, seed, color))
    return [shutil.copy(z, out) for z in tiny_zips]

  monkeypatch.setattr(synthesize, "synthesize", fake_synthesize)
  mice = prepare.ensure_dataset(_synthetic_config(tmp_path / "tfds", zip_dir))
  assert calls == [(str(zip_dir), "tiny", 0, False)] and len(mice) == 3


def test_missing_or_unusable_data_dir_is_one_line(tmp_path):
  from configs import default
  from data_prep import prepare
  config = default.get_config()
  config.data.data_dir = str(tmp_path / "missing")
  with pytest.raises(prepare.DataDirError, match=r"data_dir=.*missing: no such folder; convert"):
    prepare.ensure_dataset(config)
  config.data.data_dir = str(tmp_path)   # a folder without converted mice
  with pytest.raises(prepare.DataDirError, match=r"^config.data: mouse 'S1' is not in"):
    prepare.ensure_dataset(config)
  (tmp_path / "a_file").write_text("")
  config = _synthetic_config(tmp_path / "a_file" / "tfds", tmp_path / "zips")
  with pytest.raises(prepare.DataDirError, match=r"^config.data.data_dir=.*: cannot create"):
    prepare.ensure_dataset(config)
  # End to end: one line on stderr, no traceback.
  proc = launch(f"--workdir={tmp_path / 'run'}", "--mode=data",
                f"--config.data.data_dir={tmp_path / 'a_file' / 'tfds'}")
  line = (f"error: config.data.data_dir={tmp_path / 'a_file' / 'tfds'}: cannot create this "
          "folder (Not a directory)")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [line], proc.stderr
