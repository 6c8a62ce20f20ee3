"""Hyperparameter sweeps (v1t_jax.sweep) on the tiny synthetic mice: pruning, resuming after a
kill, two workers on one study, the report and its best command, and one-line errors."""

import glob
import json
import os
import socket
import subprocess
import sys
import types

import pytest

from configs import default
from v1t_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py") + ":tiny"
SPACE = os.path.join(ROOT, "sweeps", "tiny.py")


def options(study_dir, data_dir, trials, **kw):
  # Median pruning from epoch 1 once one trial is COMPLETE: a train.lr=0 trial (weights never
  # move) is pruned after its first epoch, behind the lr 0.02 trials.
  kw = {"sampler": "qmc", "seed": 0, "pruner": "median", "prune_after_epochs": 0,
        "prune_startup_trials": 1, **kw}
  return sweep.Options(study_dir=str(study_dir), trials=trials, config=CONFIG, space=SPACE,
                       overrides=[f"--config.data.data_dir={data_dir}"], **kw)


def events(study_dir, number):
  """TensorBoard event files of a trial: one per train_and_evaluate call on its directory."""
  return sorted(glob.glob(os.path.join(str(study_dir), "trials", str(number), "events.out.*")))


def dead_pid() -> int:
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)


def cli(*args, timeout=300):
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}   # CPU workers, even on a GPU machine
  return subprocess.run([sys.executable, "-m", "v1t_jax.sweep", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def cli_options(study_dir, data_dir, trials, startup_trials=1):
  """options() as command-line flags."""
  return [f"--config={CONFIG}", f"--space={SPACE}", f"--study_dir={study_dir}",
          f"--trials={trials}", "--sampler=qmc", "--seed=0", "--pruner=median",
          "--prune_after_epochs=0", f"--prune_startup_trials={startup_trials}",
          f"--config.data.data_dir={data_dir}"]


@pytest.fixture(scope="module")
def resumed(tiny_data_dir, tmp_path_factory):
  """Two worker processes run `--trials 2` (one command); then a worker is killed in the middle
  of trial 2 (left RUNNING, its process gone); then the same sweep with `--trials 4`."""
  study_dir = tmp_path_factory.mktemp("study")
  # Its two trials run at once: no pruning in it, or which one finishes first would decide
  # whether the other (lr 0.02 both) is pruned at epoch 2. The pruner may change between runs.
  first = cli(*cli_options(study_dir, tiny_data_dir, 2, startup_trials=2), "--workers=2")
  assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
  before = {n: (events(study_dir, n), os.stat(os.path.join(
      study_dir, "trials", str(n), "evaluation.json")).st_mtime_ns) for n in (0, 1)}
  study = sweep.open_study(str(study_dir))
  base = sweep.load_config(CONFIG, [f"--config.data.data_dir={tiny_data_dir}"])
  space = sweep.load_space(SPACE, base)[1]
  killed = sweep.claim(study, str(study_dir), 4, space, "qmc", 0, 600.0,
                       who={"host": socket.gethostname(), "pid": dead_pid(), "pid_start": None})
  assert killed.number == 2 and study.trials[2].state.name == "RUNNING"
  second = sweep.sweep(options(study_dir, tiny_data_dir, 4))
  return types.SimpleNamespace(dir=study_dir, first=first, second=second, before=before,
                               killed=killed.number, killed_params=dict(killed.params),
                               data_dir=tiny_data_dir)


def test_four_trial_study_with_pruning(resumed):
  study = sweep.open_study(str(resumed.dir))
  finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
  assert len(finished) == 4 and resumed.second["counts"]["COMPLETE"] >= 1
  pruned = [t for t in finished if t.state.name == "PRUNED"]
  assert pruned, "no trial was pruned"
  for t in pruned:
    # Stopped by the pruner after epoch 1, a complete run directory all the same.
    assert t.user_attrs["stop_reason"] == "pruned" and t.user_attrs["epochs"] == 1
    assert list(t.intermediate_values) == [1] and t.params["train.lr"] == 0.0
    earlier = [c.intermediate_values[1] for c in study.trials
               if c.state.name == "COMPLETE" and c.number < t.number]
    assert earlier and t.intermediate_values[1] < sorted(earlier)[len(earlier) // 2]
    assert os.path.exists(os.path.join(resumed.dir, "trials", str(t.number), "evaluation.json"))
  for t in finished:
    if t.state.name == "COMPLETE":
      # The objective: the best epoch's validation correlation, reported after every epoch.
      assert sorted(t.intermediate_values) == [1, 2]
      assert t.value == pytest.approx(max(t.intermediate_values.values()), abs=1e-6)
      with open(os.path.join(resumed.dir, "trials", str(t.number), "evaluation.json")) as f:
        saved = json.load(f)
      assert saved["validation"]["single_trial_correlation_average"] == pytest.approx(t.value)
  # The report: trials.csv (every trial, the redone one too) and both figures.
  with open(os.path.join(resumed.dir, "trials.csv")) as f:
    rows = f.read().splitlines()
  assert rows[0].startswith("number,state,best_val_corr,epochs,train.lr,data.shuffle_seed,")
  assert len(rows) == 1 + len(study.trials)
  assert set(resumed.second["figures"]) == {"history.png", "importances.png"}


def test_resume_repeats_nothing_and_redoes_the_killed_trial(resumed):
  study = sweep.open_study(str(resumed.dir))
  # The first two trials were not trained again.
  for n, (files, mtime) in resumed.before.items():
    assert len(files) == 1 and events(resumed.dir, n) == files
    assert os.stat(os.path.join(resumed.dir, "trials", str(n), "evaluation.json")).st_mtime_ns \
        == mtime
  # The killed trial is FAIL and redone once, with its parameters, under a new number.
  killed = study.trials[resumed.killed]
  assert killed.state.name == "FAIL" and killed.user_attrs["stop_reason"].startswith(
      "redone: its process")
  redone = [t for t in study.trials if t.user_attrs.get("retry_of") == resumed.killed]
  assert len(redone) == 1 and redone[0].params == resumed.killed_params
  assert redone[0].state.name in ("COMPLETE", "PRUNED")
  assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
  assert all(len(events(resumed.dir, n)) == 1 for n in (0, 1, 3, 4))
  # The same command once more: the study is complete, nothing runs.
  again = sweep.sweep(options(resumed.dir, resumed.data_dir, 4))
  assert again["trials"] == 5 and all(len(events(resumed.dir, n)) == 1 for n in (0, 1, 3, 4))


def test_best_command_reproduces_the_best_trial(resumed):
  study = sweep.open_study(str(resumed.dir))
  command = resumed.second["command"]
  assert command[:3] == ["python", "launch_train.py", f"--config={CONFIG}"]
  assert f"--config.train.lr={study.best_trial.params['train.lr']!r}" in command
  proc = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  retrained = json.loads(proc.stdout.strip().splitlines()[-1])
  assert retrained["validation"]["single_trial_correlation_average"] == pytest.approx(
      study.best_value, abs=1e-6)


def test_two_workers_never_run_the_same_trial(resumed):
  said = resumed.first.stdout
  assert "2 workers share this machine's CPUs" in said and "retrain it with" in said
  assert "study " in said and "2 trials (2 complete" in said
  study = sweep.open_study(str(resumed.dir))
  trials = study.trials[:2]
  assert [t.number for t in trials] == [0, 1]
  assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 2
  assert len({t.user_attrs["pid"] for t in trials}) == 2      # both workers trained a trial
  assert all(len(files) == 1 for files, _ in resumed.before.values())   # each trained once
  assert len(glob.glob(str(resumed.dir / "logs" / "*-worker*.log"))) == 2


def fake_train(outcome):
  """A train_and_evaluate stand-in: raises `outcome` or returns it as the validation corr."""
  def train_fn(config, workdir, on_epoch=None):
    os.makedirs(workdir, exist_ok=True)
    if isinstance(outcome, BaseException):
      raise outcome
    on_epoch(1, {"single_trial_correlation_average": outcome})
    return {"validation": {"single_trial_correlation_average": outcome},
            "stop_reason": "max epochs"}
  return train_fn


def test_failed_diverged_and_interrupted_trials(tiny_data_dir, tmp_path, capsys):
  study_dir = tmp_path / "study"
  # A diverged trial (NaN in its first epoch) counts, as PRUNED.
  diverged = RuntimeError("training stopped before any epoch finished well: NaN/inf loss")
  out = sweep.sweep(options(study_dir, tiny_data_dir, 1), train_fn=fake_train(diverged))
  assert out["counts"]["PRUNED"] == 1
  said = capsys.readouterr().out
  assert "best: none yet (no COMPLETE trial)" in said
  assert "history.png skipped: no COMPLETE trial yet" in said
  assert "importances.png skipped: needs >= 2 COMPLETE trials, has 0" in said
  # Errors fail their trial and the next one runs; a worker stops after max_failures in a row.
  with pytest.raises(sweep.SweepError, match="2 trials in a row failed .* ValueError: boom"):
    sweep.sweep(options(study_dir, tiny_data_dir, 5, max_failures=2),
                train_fn=fake_train(ValueError("boom")))
  study = sweep.open_study(str(study_dir))
  assert [t.state.name for t in study.trials] == ["PRUNED", "FAIL", "FAIL"]
  # Ctrl-C / SIGTERM: the trial is FAIL and queued again, so that the next run redoes it.
  with pytest.raises(KeyboardInterrupt):
    sweep.sweep(options(study_dir, tiny_data_dir, 5), train_fn=fake_train(KeyboardInterrupt()))
  study = sweep.open_study(str(study_dir))
  assert study.trials[3].state.name == "FAIL" and study.trials[4].state.name == "WAITING"
  assert study.trials[4].user_attrs["retry_of"] == 3
  sweep.sweep(options(study_dir, tiny_data_dir, 2), train_fn=fake_train(0.25))
  study = sweep.open_study(str(study_dir))
  assert study.trials[4].state.name == "COMPLETE" and study.trials[4].value == 0.25
  assert study.trials[4].params == study.trials[3].params and len(study.trials) == 5
  # A live trial that another worker took for dead (no heartbeat) stops at its next epoch and
  # leaves the study to its queued copy.
  answers = []

  def presumed_dead(config, workdir, on_epoch=None):
    if not answers:
      other = sweep.open_study(str(study_dir))   # another worker's view of the study
      sweep._fail_and_requeue(other, other.trials[int(os.path.basename(workdir))],
                              "no heartbeat for 700 s")
    answers.append(on_epoch(1, {"single_trial_correlation_average": 0.5}))
    return {"validation": {"single_trial_correlation_average": 0.5},
            "stop_reason": "pruned" if answers[-1] else "max epochs"}

  sweep.sweep(options(study_dir, tiny_data_dir, 3), train_fn=presumed_dead)
  assert answers == [True, False]
  study = sweep.open_study(str(study_dir))
  assert [t.state.name for t in study.trials[5:]] == ["FAIL", "COMPLETE"]
  assert study.trials[6].user_attrs["retry_of"] == 5 and study.trials[6].value == 0.5


def test_stale_trials_of_other_hosts_go_by_heartbeat(tmp_path):
  heartbeat = tmp_path / "trials" / "7" / "heartbeat"
  heartbeat.parent.mkdir(parents=True)
  heartbeat.touch()
  os.utime(heartbeat, (1000.0, 1000.0))
  trial = types.SimpleNamespace(number=7, user_attrs={"host": "elsewhere", "pid": 1},
                                datetime_start=None)
  assert sweep.stale_reason(trial, str(tmp_path), 600.0, now=1500.0) is None
  assert sweep.stale_reason(trial, str(tmp_path), 600.0, now=1700.0) == "no heartbeat for 700 s"
  here = types.SimpleNamespace(number=8, user_attrs={"host": socket.gethostname(),
                                                     "pid": os.getpid(), "pid_start": None},
                               datetime_start=None)
  assert sweep.stale_reason(here, str(tmp_path), 600.0, now=1e12) is None   # alive: never stale
  here.user_attrs["pid"] = dead_pid()
  assert "is gone" in sweep.stale_reason(here, str(tmp_path), 600.0, now=0.0)


def test_workers_get_their_own_gpus():
  assert sweep.worker_envs(2, []) == [{}, {}]
  assert sweep.worker_envs(2, ["0", "1", "2", "3"]) == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                                        {"CUDA_VISIBLE_DEVICES": "2,3"}]
  assert sweep.worker_envs(3, ["4", "5", "6"])[2] == {"CUDA_VISIBLE_DEVICES": "6"}
  shared = sweep.worker_envs(4, ["0", "1"])
  assert [e["CUDA_VISIBLE_DEVICES"] for e in shared] == ["0", "1", "0", "1"]
  assert all(e["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.45" for e in shared)


def test_v1t_space_maps_the_original_sweep():
  config = default.get_config()
  space_dict, space = sweep.load_space(os.path.join(ROOT, "sweeps", "v1t.py"), config)
  assert len(space) == 13 and space_dict["model.shift_mode"]["choices"] == [0, 2]
  tokens = sweep.trial_overrides({"train.lr": 0.01, "train.core_lr": 0.5, "model.emb_dim": 3,
                                  "model.shift_mode": 0}, space, config)
  assert tokens == ["--config.train.lr=0.01", "--config.train.core_lr=0.005",
                    "--config.model.emb_dim=24", "--config.model.shift_mode=0"]
  loaded = sweep.load_config(os.path.join(ROOT, "configs", "default.py"), tokens)
  assert (loaded.train.core_lr, loaded.model.emb_dim) == (0.005, 24)


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"type": "float", "low": 0.1, "high": 1.0}},
     "'train.lrr': unknown config field"),
    ({"train": {"type": "float", "low": 0.1, "high": 1.0}}, "'train': is a section"),
    ({"train.lr": {"type": "uniform"}}, "'train.lr': a spec is a dict with type"),
    ({"train.lr": {"type": "float", "low": 0.1}}, "'train.lr': needs a numeric 'high'"),
    ({"model.num_heads": {"type": "float", "low": 1.5, "high": 4.0}}, "'model.num_heads': "),
    ({"model.shift_mode": {"type": "categorical", "choices": [1, 2]}},
     "'model.shift_mode': shift_mode=1: the image shifter"),
    ({"train.lr": {"type": "float", "low": 0.1, "high": 1.0, "logg": True}}, "unknown spec keys"),
])
def test_bad_spaces_are_one_line_errors_naming_file_and_key(space, message):
  with pytest.raises(sweep.SweepError) as e:
    sweep.parse_space(space, default.get_config(), "sweeps/mine.py")
  assert str(e.value).startswith("sweeps/mine.py: ") and message in str(e.value)
  assert "\n" not in str(e.value)


def test_bad_command_lines_are_one_line_errors(tmp_path):
  proc = cli(f"--study_dir={tmp_path}", "--report", "stray")
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("v1t_jax.sweep: usage error: unexpected argument 'stray' "
                                 "(flags are --name=value; see --help)")
  proc = cli(f"--config={CONFIG}", "--space=sweeps/missing.py", f"--study_dir={tmp_path}",
             "--trials=2")
  assert proc.returncode == 2
  assert proc.stderr.strip() == "v1t_jax.sweep: error: --space=sweeps/missing.py: no such file"
  with pytest.raises(sweep.SweepError, match=r"--study_dir=.*: no study there"):
    sweep.report(str(tmp_path / "nothing"))
  with pytest.raises(sweep.SweepError, match="--trials=0: must be >= 1"):
    sweep.sweep(options(tmp_path, "data", 0))
  with pytest.raises(sweep.SweepError, match=r"--config.train.lr is fixed on the command line"):
    sweep.sweep(sweep.Options(study_dir=str(tmp_path), trials=1, config=CONFIG, space=SPACE,
                              overrides=["--config.train.lr=0.1"]))
  with pytest.raises(sweep.SweepError, match=r"--config=.*synthetic.py:tiny --config.train.lrr"):
    sweep.sweep(sweep.Options(study_dir=str(tmp_path), trials=1, config=CONFIG, space=SPACE,
                              overrides=["--config.train.lrr=0.1"]))
