"""What users type works or fails loudly: damaged checkpoints, resuming with another config,
two trainers on one workdir, progress lines."""

import contextlib
import glob
import io
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import tiny_config  # the tiny run's config, one home

from v1t_jax import checkpoints, progress, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def truncate(path: str):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def test_damaged_latest_checkpoint_is_named_moved_and_an_older_one_resumed(
    tiny_data_dir, one_epoch_copy, capsys):
  config = tiny_config(tiny_data_dir, num_epochs=1, checkpoint_every_steps=1)
  config.train.progress_every_s = 0.0
  trainer = train.setup(config)
  ckpts = os.path.join(one_epoch_copy, "checkpoints")
  for path in glob.glob(os.path.join(ckpts, "3", "state", "**", "d", "*"), recursive=True):
    truncate(path)   # the arrays' data files, cut in half
  latest, best = checkpoints.checkpoint_managers(one_epoch_copy)
  state, meta = checkpoints.restore_newest_intact(latest, trainer, one_epoch_copy)
  said = capsys.readouterr().out
  assert meta["step"] == 2 and int(state["step"]) == 2
  assert f"checkpoint {ckpts}/3 is damaged (" in said
  assert f"moved it to {one_epoch_copy}/damaged_checkpoints/3 and resuming from step 2" in said
  assert latest.all_steps() == [2]
  assert os.path.isdir(os.path.join(one_epoch_copy, "damaged_checkpoints", "3", "state"))   # kept
  latest.close(), best.close()

  # The run itself: resumes from step 2, redoes step 3; the damaged copy stays aside.
  result = train.train_and_evaluate(config, one_epoch_copy)
  assert "resumed from step 2 (epoch 0)" in capsys.readouterr().out
  assert result["stop_reason"] == "max epochs"
  assert sorted(os.listdir(ckpts)) == ["2", "3"]
  assert os.listdir(os.path.join(one_epoch_copy, "damaged_checkpoints")) == ["3"]

  # Every checkpoint damaged (here: a metadata file removed): stop, name each, move nothing.
  for step in ("2", "3"):
    os.remove(os.path.join(ckpts, step, "meta", "metadata"))
  latest, best = checkpoints.checkpoint_managers(one_epoch_copy)
  with pytest.raises(checkpoints.RunError, match=r"no intact checkpoint to resume from \("
                     rf"{ckpts}/3: FileNotFoundError.*; {ckpts}/2: FileNotFoundError"):
    checkpoints.restore_newest_intact(latest, trainer, one_epoch_copy)
  assert sorted(os.listdir(ckpts)) == ["2", "3"]
  latest.close(), best.close()


def test_a_nan_checkpoint_of_an_older_version_counts_as_damaged(tiny_data_dir, one_epoch_copy,
                                                               capsys):
  # Versions before the finiteness check could save NaN states as the latest checkpoint.
  import jax
  import numpy as np
  config = tiny_config(tiny_data_dir, num_epochs=1, checkpoint_every_steps=1)
  config.train.progress_every_s = 0.0
  trainer = train.setup(config)
  latest, best = checkpoints.checkpoint_managers(one_epoch_copy)
  state, meta = checkpoints.restore(latest, trainer, 3)
  state["params"] = jax.tree.map(lambda x: x * np.nan, state["params"])
  checkpoints.save(latest, state, dict(meta, step=4))
  latest.wait_until_finished()
  assert latest.all_steps() == [3, 4]
  _, meta = checkpoints.restore_newest_intact(latest, trainer, one_epoch_copy)
  assert meta["step"] == 3 and latest.all_steps() == [3]
  assert "checkpoints/4 is damaged (it holds NaN/inf values); moved it to " in (
      capsys.readouterr().out)
  latest.close(), best.close()


def test_evaluate_without_a_checkpoint_says_so_in_one_line(tiny_zips, tiny_data_dir, one_epoch_copy,
                                                           tmp_path):
  empty = tmp_path / "never_trained"
  proc = subprocess.run(
      [sys.executable, "launch_train.py", "--config=configs/synthetic.py:tiny", "--mode=evaluate",
       f"--workdir={empty}", f"--config.data.data_dir={tiny_data_dir}",
       f"--config.synthetic.zip_dir={os.path.dirname(tiny_zips[0])}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --mode=evaluate: no checkpoint in {empty}/best (train first with --mode=train, "
      "or check --workdir)")
  assert not os.path.exists(empty)   # no folder made, no data read

  config = tiny_config(tiny_data_dir)
  config.eval.step = 7
  with pytest.raises(checkpoints.RunError, match=r"--config.eval.step=7: no such checkpoint in .*"
                     r"checkpoints \(there: 2, 3\)"):
    train.evaluate_checkpoint(config, one_epoch_copy)
  config.eval.step = None
  for path in glob.glob(os.path.join(one_epoch_copy, "best", "3", "state", "**", "d", "*"),
                        recursive=True):
    truncate(path)
  with pytest.raises(checkpoints.RunError, match=f"checkpoint {one_epoch_copy}/best/3 is damaged"):
    train.evaluate_checkpoint(config, one_epoch_copy)


def test_resume_with_another_model_or_batch_size_names_the_fields(tiny_zips, tiny_data_dir,
                                                                   one_epoch_copy, capsys):
  ckpt = f"{one_epoch_copy}/checkpoints/3"
  config = tiny_config(tiny_data_dir, num_epochs=2)
  config.model.emb_dim = 8
  with pytest.raises(checkpoints.RunError) as error:
    train.train_and_evaluate(config, one_epoch_copy)
  assert str(error.value) == (
      f"{ckpt} holds another model than this config (model.emb_dim 16 -> 8); resume with the "
      "checkpoint's values or use another --workdir")
  config = tiny_config(tiny_data_dir, num_epochs=2)
  config.data.batch_size = 8
  with pytest.raises(checkpoints.RunError, match=rf"^{ckpt} was trained with other step settings "
                     r"\(data.batch_size 4 -> 8\): its step counter"):
    train.train_and_evaluate(config, one_epoch_copy)
  assert not os.path.exists(os.path.join(one_epoch_copy, "damaged_checkpoints"))   # not "damage"
  assert sorted(os.listdir(os.path.join(one_epoch_copy, "checkpoints"))) == ["2", "3"]

  # Other differences resume, and are named in one line.
  config = tiny_config(tiny_data_dir, num_epochs=2, lr=0.01, checkpoint_every_steps=1,
                       figures_every_epochs=1, lr_decay_epochs=1)
  config.train.progress_every_s = 0.0
  config.synthetic.zip_dir = os.path.dirname(tiny_zips[0])   # as in the run (its oracle)
  config.model.t_dropout = 0.0
  latest, best = checkpoints.checkpoint_managers(one_epoch_copy)
  _, meta = checkpoints.restore_newest_intact(latest, train.setup(config), one_epoch_copy)
  latest.close(), best.close()
  assert meta["step"] == 3
  assert capsys.readouterr().out.splitlines()[-1] == (
      "resuming with settings other than the checkpoint's: model.t_dropout 0.2544 -> 0.0, "
      "train.lr 0.001647 -> 0.01, train.num_epochs 1 -> 2")


HOLD_THE_LOCK = """
import sys, time
from v1t_jax import checkpoints
with checkpoints.workdir_lock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(300)
"""


def test_second_trainer_on_a_workdir_is_refused_and_a_killed_ones_lock_is_free(
    tiny_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, workdir], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(checkpoints.RunError, match=rf"^{workdir} is in use by another training run "
                       rf"\(pid {holder.pid} on .+\); wait for it to end, or use another"):
      train.train_and_evaluate(tiny_config(tiny_data_dir), workdir)
    assert sorted(os.listdir(workdir)) == [".lock"]   # refused before anything was written
  finally:
    holder.kill()   # SIGKILL: no cleanup, the lock file stays
    holder.wait()
  assert os.path.exists(os.path.join(workdir, ".lock"))
  # Free again (the kernel released the dead one's lock); a second open file in this process
  # conflicts too.
  with checkpoints.workdir_lock(workdir), pytest.raises(checkpoints.RunError, match="is in use by another"), \
      checkpoints.workdir_lock(workdir):
    pass
  with checkpoints.workdir_lock(workdir):   # released on exit
    pass


def test_progress_lines_during_epochs_and_evaluation(one_epoch_run):
  # The run's own lines (progress every 0 s: every step and batch).
  said = one_epoch_run[2].splitlines()
  steps = [line for line in said if line.startswith("epoch 1/1: step ")]
  assert [line.split(" (")[0] for line in steps] == [f"epoch 1/1: step {i}/3" for i in (1, 2, 3)]
  assert all(re.search(r"\(\d+%\), [\d.e+]+ steps/s, ETA \d+:\d\d:\d\d$", line)
             for line in steps), steps
  assert said.index(steps[-1]) < said.index(next(x for x in said if x.startswith("epoch 1/1 step")))
  assert any(line.startswith("evaluating validation: batch 1/") for line in said)
  assert any(line.startswith("challenge metrics on test: batch ") for line in said)

  # Rate, ETA and spacing on a fake clock: nothing before every_s, then one line per every_s.
  now = [100.0]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    line = progress.Progress("epoch 2/5", 100, done=10, every_s=30, clock=lambda: now[0])
    printed = []
    for done in range(11, 101):
      now[0] += 0.5   # 2 steps/s
      printed.append(line(done))
  lines = out.getvalue().splitlines()
  assert sum(printed) == len(lines) == 1   # 45 s in all: one line, at 30 s
  assert lines[0] == "epoch 2/5: step 70/100 (70%), 2 steps/s, ETA 0:00:15"
  assert progress.duration(float("inf")) == "?" and progress.duration(3725.4) == "1:02:05"


def test_a_nan_stop_makes_launch_train_fail(tiny_zips, tiny_data_dir, one_epoch_copy):
  # Resumed at a diverging lr with a checkpoint every step: step 4 (params ~1e38) is finite and
  # saved, step 5 is not; the NaN steps neither become checkpoints nor push the good ones out.
  proc = subprocess.run(
      [sys.executable, "launch_train.py", "--config=configs/synthetic.py:tiny",
       f"--workdir={one_epoch_copy}", f"--config.data.data_dir={tiny_data_dir}",
       f"--config.synthetic.zip_dir={os.path.dirname(tiny_zips[0])}",
       "--config.train.num_epochs=2", "--config.train.lr=1e38",
       "--config.train.checkpoint_every_steps=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: NaN/inf parameters or optimizer state at step 5 (epoch 1); stopped without saving "
      f"it, the last good checkpoint is {one_epoch_copy}/checkpoints/4")
  assert sorted(os.listdir(os.path.join(one_epoch_copy, "checkpoints"))) == ["3", "4"]
  assert '"checkpoint_step": 3' in proc.stdout   # the best state was still evaluated
  config = tiny_config(tiny_data_dir)
  trainer = train.setup(config)
  latest, best = checkpoints.checkpoint_managers(one_epoch_copy)
  for step in latest.all_steps():
    state, _ = checkpoints.restore(latest, trainer, step)
    assert all(np.isfinite(np.asarray(x)).all()
               for x in jax.tree.leaves((state["params"], state["opt_state"])))
  latest.close(), best.close()
