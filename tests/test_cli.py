"""Every absl entry point as users type it: stray arguments are usage errors, --help exits 0."""

import os
import subprocess
import sys

import pytest
from absl import app

from v1t_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}


def command(*args, timeout=120):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=ENV)


def test_no_positional():
  cli.no_positional(["prog"])
  with pytest.raises(app.UsageError, match="'stray other'"):
    cli.no_positional(["prog", "stray", "other"])


# Light entry points end to end (no TensorFlow or JAX before main); the check is main's first line.
@pytest.mark.parametrize("args", [
    ["launch_train.py", "--config=configs/synthetic.py:tiny", "--workdir=/nonexistent/w"],
    ["-m", "data_prep.synthesize", "--out=/nonexistent/zips"],
    ["-m", "data_prep.oracle", "--zips=/nonexistent/zips"],
])
def test_stray_argument_is_a_usage_error(args):
  proc = command(*args, "stray_word")
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "unexpected positional argument(s) 'stray_word'" in proc.stderr
  assert "Traceback" not in proc.stderr and "nonexistent" not in proc.stdout + proc.stderr


def test_stray_argument_in_summary_main():
  from v1t_jax import summary
  with pytest.raises(app.UsageError, match="'stray'"):
    summary.main(["summary", "stray"])


@pytest.mark.parametrize("args", [
    ["launch_train.py", "--help"], ["launch_train.py", "--helpfull"],
    ["-m", "data_prep.convert", "--help"], ["-m", "data_prep.synthesize", "--helpshort"],
    ["-m", "data_prep.oracle", "--help"], ["-m", "v1t_jax.summary", "--help"],
])
def test_help_exits_zero(args):
  proc = command(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "flags:" in proc.stdout or "--" in proc.stdout
  if args[0] == "launch_train.py" and args[1] == "--help":
    assert "--mode=show_config" in proc.stdout and "--workdir" in proc.stdout


def test_show_config_lists_fields_with_overrides():
  from configs import synthetic
  proc = command("launch_train.py", "--config=configs/synthetic.py:tiny", "--mode=show_config",
                 "--config.train.lr=0.5")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  config = synthetic.get_config("tiny")
  assert [x.split(":")[0] for x in lines if x and not x[0].isspace()] == sorted(config.keys())
  train = lines[lines.index("train:") + 1:]
  assert "  lr: 0.5" in train[:[not x.startswith(" ") for x in train].index(True)]


def test_workdir_required_except_for_show_config():
  proc = command("launch_train.py", "--config=configs/synthetic.py:tiny")
  assert proc.returncode == 1
  assert "--workdir is required (except with --mode=show_config)" in proc.stderr


@pytest.mark.parametrize("override, line", [
    ("--config.train.lr_typo=1", ("FATAL Flags parsing error: --config.train.lr_typo=1: no such "
                                  "config field: 'lr_typo'")),
    ("--config.trian.lr=1", ("FATAL Flags parsing error: --config.trian.lr=1: no such config "
                             "field: 'trian'. Did you mean \"train\" instead of \"trian\"?")),
])
def test_unknown_config_field_is_a_one_line_flags_error(override, line, tmp_path):
  proc = command("launch_train.py", "--config=configs/synthetic.py:tiny",
                 f"--workdir={tmp_path}", "--config.train.lr=0.1", override)
  assert proc.returncode == 1
  assert proc.stderr.splitlines()[0] == line and "Traceback" not in proc.stderr, proc.stderr
  assert not os.listdir(tmp_path)


def test_unusable_compilation_cache_is_one_line(tmp_path):
  (tmp_path / "a_file").write_text("")
  bad = tmp_path / "a_file" / "cache"
  proc = command("launch_train.py", "--config=configs/synthetic.py:tiny",
                 f"--workdir={tmp_path / 'run'}", f"--compilation_cache={bad}")
  assert proc.returncode == 1 and not os.path.exists(tmp_path / "run")   # nothing made
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --compilation_cache={bad}: not a writable folder")


def test_compilation_cache_default_env_and_off(tmp_path, monkeypatch, capsys):
  import jax
  updates = []
  monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert cli.compilation_cache(None) == str(tmp_path / "env")       # the env var, made
  assert os.path.isdir(tmp_path / "env")
  assert ("jax_compilation_cache_dir", str(tmp_path / "env")) in updates
  assert ("jax_compilation_cache_max_size", cli.CACHE_MAX_BYTES) in updates   # locked, bounded
  updates.clear()
  assert cli.compilation_cache("") is None and updates == [("jax_enable_compilation_cache", False)]
  # An unusable default (no env var; a read-only home) turns the cache off with a warning.
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  (tmp_path / "a_file").write_text("")
  monkeypatch.setattr(cli, "DEFAULT_CACHE", str(tmp_path / "a_file" / "cache"))
  updates.clear()
  assert cli.compilation_cache(None) is None
  assert updates == [("jax_enable_compilation_cache", False)]
  assert "compilation cache off" in capsys.readouterr().err
