r"""Hyperparameter sweeps with Optuna, on one machine or on many that share a disk.

  python -m v1t_jax.sweep --config=configs/default.py --space=sweeps/v1t.py \
      --study_dir=runs/sweep --trials=50 [--workers=W] [--sampler=qmc|tpe] \
      [--config.data.data_dir=data/sensorium_tfds ...]
  python -m v1t_jax.sweep --study_dir=runs/sweep --report

The study lives in `--study_dir`: `journal.log` (Optuna's JournalStorage, safe for several
processes and hosts on one disk, NFS included), one ordinary run directory per trial in
`trials/<number>/` (trained by `train.train_and_evaluate`, exactly as launch_train.py trains, with
the trial's overrides applied), and the report (`trials.csv`, `history.png`, `importances.png`).

`--trials N` is the study's total: the same command again finishes what is missing (COMPLETE and
PRUNED trials count) and repeats nothing. A trial left RUNNING by a process that died (same host:
the process is gone; another host: no heartbeat for `--stale_after_s`) is marked FAIL and its
parameters are queued again, so that it is redone. `--workers W` starts W processes on this
machine, each on its own GPU(s); other hosts join by running the same command.

Each trial reports the validation single-trial correlation after every epoch (`trial.report`),
and the pruner (`--pruner`) may stop it there (state PRUNED). The objective is the trial's best
validation single-trial correlation.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

from v1t_jax import allocator

if __name__ == "__main__":
  allocator.keep_freed_memory()   # before TensorFlow and JAX start threads; see allocator.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from v1t_jax import cli  # noqa: E402

STUDY_NAME = "v1t"
JOURNAL = "journal.log"
OBJECTIVE = "validation single-trial correlation"
SAMPLERS = ("qmc", "tpe")
PRUNERS = ("median", "halving", "hyperband", "none")
SPEC_KEYS = {"float": {"type", "low", "high", "log", "step", "times"},
             "int": {"type", "low", "high", "log", "step", "times"},
             "categorical": {"type", "choices"}}


class SweepError(ValueError):
  """A one-line message for the user (a bad flag, file or study)."""


def _optuna():
  try:
    import optuna
  except ImportError:
    raise SweepError("optuna is not installed: pip install -e '.[sweep]'") from None
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  return optuna


# ---------------------------------------------------------------------------------------------
# Configs and search spaces.


def load_config(config_ref: str, overrides: list[str]):
  """The config exactly as launch_train.py builds it from `--config=ref` and `--config.x=v`."""
  argv = ["v1t_jax.sweep", f"--config={config_ref}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
    config = values.config
    config.keys()   # a config file that failed to load raises only when used
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    # A config file that raised: its traceback's last line says why.
    why = f"{lines[0]} {lines[-1]}" if "Traceback" in str(e) else " ".join(lines)
    raise SweepError(" ".join([f"--config={config_ref}", *overrides]) + f": {why}") from None
  return config


def _get(config, name: str):
  node = config
  for part in name.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      raise KeyError(name)
    node = node[part]
  return node


def _set(config, name: str, value):
  *parents, leaf = name.split(".")
  node = config
  for part in parents:
    node = node[part]
  setattr(node, leaf, value)


@dataclasses.dataclass(frozen=True)
class Param:
  """One dimension of a search space: a config field and the distribution of its values."""
  name: str            # dotted config field, e.g. "train.lr"
  distribution: object  # an optuna distribution
  times: float | str | None = None  # the field gets value * times (a number or another field)


def _spec_error(path: str, name: str, message: str) -> SweepError:
  return SweepError(f"{path}: {name!r}: {message}")


def parse_space(space: dict, config, path: str = "space") -> list[Param]:
  """Checks a `get_space()` dict against the config; an error names the file and the key."""
  distributions = _optuna().distributions
  from v1t_jax.model import ModelConfig
  if not isinstance(space, dict) or not space:
    raise SweepError(f"{path}: get_space() must return a non-empty dict of field -> spec")
  params = []
  for name, spec in space.items():
    if not isinstance(name, str):
      raise _spec_error(path, str(name), "field names are dotted strings like 'train.lr'")
    try:
      current = _get(config, name)
    except KeyError:
      raise _spec_error(path, name, "unknown config field") from None
    if hasattr(current, "keys"):
      raise _spec_error(path, name, "is a section of the config, not a field")
    if not isinstance(spec, dict) or spec.get("type") not in SPEC_KEYS:
      raise _spec_error(path, name, "a spec is a dict with type 'float', 'int' or 'categorical'")
    kind = spec["type"]
    unknown = sorted(set(spec) - SPEC_KEYS[kind])
    if unknown:
      raise _spec_error(path, name, f"unknown spec keys {unknown} for type {kind!r}")
    times = spec.get("times")
    try:
      if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices or not all(
            isinstance(c, (bool, int, float, str)) for c in choices):
          raise ValueError("choices must be a non-empty list of numbers, strings or booleans")
        dist = distributions.CategoricalDistribution(tuple(choices))
        values = list(choices)
      else:
        for key in ("low", "high"):
          if not isinstance(spec.get(key), (int, float)) or isinstance(spec.get(key), bool):
            raise ValueError(f"needs a numeric {key!r}")
        log, step = bool(spec.get("log", False)), spec.get("step")
        if kind == "int":
          if not all(isinstance(spec[k], int) for k in ("low", "high")):
            raise ValueError("'low' and 'high' of an int spec must be integers")
          dist = distributions.IntDistribution(spec["low"], spec["high"], log=log, step=step or 1)
        else:
          dist = distributions.FloatDistribution(spec["low"], spec["high"], log=log, step=step)
        values = [spec["low"], spec["high"]]
      if isinstance(times, str):   # a factor of another field (the original's core_lr_scale)
        other = space.get(times) if times in space else (
            _get(config, times) if _has(config, times) else None)
        if (times == name or other is None or isinstance(other, bool)
            or isinstance(other, dict) and isinstance(other.get("times"), str)):
          raise ValueError(f"'times' must name another numeric field, got {times!r}")
        if kind != "float":
          raise ValueError("'times' with a field needs a float spec")
      elif times is not None:
        if not isinstance(times, (int, float)) or isinstance(times, bool) or kind == "categorical":
          raise ValueError("'times' is a number (float / int specs) or another field's name")
        values = [v * times for v in values]
      # Every bound / choice must fit the field's type and the model's allowed modes.
      trial_config = config.copy_and_resolve_references()
      for value in values:
        _set(trial_config, name, value)
        if name.startswith("model."):
          ModelConfig.from_config(trial_config.model)
    except (ValueError, TypeError) as e:
      raise _spec_error(path, name, str(e).splitlines()[0]) from None
    params.append(Param(name, dist, times))
  return params


def _has(config, name: str) -> bool:
  try:
    _get(config, name)
    return True
  except KeyError:
    return False


def load_space(path: str, config) -> tuple[dict, list[Param]]:
  """A space file (`def get_space() -> dict`) -> (the dict, its checked params)."""
  import importlib.util
  if not path or not os.path.isfile(path):
    raise SweepError(f"--space={path}: no such file")
  spec = importlib.util.spec_from_file_location(f"_v1t_space_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_space", None)):
      raise SweepError(f"--space={path}: defines no get_space()")
    space = module.get_space()
  except SweepError:
    raise
  except Exception as e:   # a broken space file: say which and why, in one line
    why = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise SweepError(f"--space={path}: cannot be loaded: {type(e).__name__}: {why}") from None
  return space, parse_space(space, config, path)


def _text(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  return repr(value) if isinstance(value, float) else str(value)


def trial_overrides(params: dict, space: list[Param], config) -> list[str]:
  """A trial's parameter values as `--config.x=v` arguments (with `times` applied)."""
  values = {}
  for p in space:
    if p.name in params and not isinstance(p.times, str):
      values[p.name] = params[p.name] * p.times if p.times is not None else params[p.name]
  for p in space:
    if p.name in params and isinstance(p.times, str):
      base = values[p.times] if p.times in values else _get(config, p.times)
      values[p.name] = params[p.name] * base
  return [f"--config.{name}={_text(values[name])}" for name in (p.name for p in space)
          if name in values]


# ---------------------------------------------------------------------------------------------
# The study: storage, claiming trials, stale trials.


def open_study(study_dir: str, create: bool = False):
  """The study of `study_dir` (JournalStorage in journal.log), created when `create`."""
  optuna = _optuna()
  from optuna.storages.journal import JournalFileBackend
  journal = os.path.join(study_dir, JOURNAL)
  if not os.path.exists(journal):
    if not create:
      raise SweepError(f"--study_dir={study_dir}: no study there (no {JOURNAL})")
    if os.listdir(os.path.join(study_dir, "trials")) if os.path.isdir(
        os.path.join(study_dir, "trials")) else False:   # a new study would reuse their numbers
      raise SweepError(f"--study_dir={study_dir}: has trials/ but no {JOURNAL}; use a new "
                       f"--study_dir")
  os.makedirs(study_dir, exist_ok=True)
  storage = optuna.storages.JournalStorage(JournalFileBackend(journal))
  return optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize",
                             load_if_exists=True)


@contextlib.contextmanager
def _locked(study_dir: str, grace_period: int = 120):
  """Excludes the other workers (any host; a lock file, safe on NFS) while claiming trials."""
  from optuna.storages.journal import JournalFileSymlinkLock
  lock = JournalFileSymlinkLock(os.path.join(study_dir, "claim"), grace_period=grace_period)
  lock.acquire()
  try:
    yield
  finally:
    lock.release()


def make_sampler(name: str, seed: int | None, number: int):
  """QMC (scrambled Sobol, one sequence shared by every worker through the study) or TPE
  (reseeded per trial number, so that concurrent workers never draw the same startup trials)."""
  optuna = _optuna()
  if name == "qmc":
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False,
                                        warn_asynchronous_seeding=False)
  if name == "tpe":
    return optuna.samplers.TPESampler(seed=None if seed is None else seed + number,
                                      constant_liar=True)
  raise SweepError(f"--sampler={name}: one of {SAMPLERS}")


def make_pruner(name: str, after_epochs: int, startup_trials: int, reduction_factor: int,
                max_epochs: int):
  """Median (prune below the median of earlier trials at the same epoch), successive halving or
  Hyperband (the original's W&B `early_terminate`), or none; epochs are Optuna's steps."""
  pruners = _optuna().pruners
  if name == "median":
    return pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=after_epochs)
  if name == "halving":
    return pruners.SuccessiveHalvingPruner(min_resource=max(1, after_epochs),
                                           reduction_factor=reduction_factor)
  if name == "hyperband":
    return pruners.HyperbandPruner(min_resource=max(1, after_epochs),
                                   max_resource=max(max_epochs, after_epochs + 1),
                                   reduction_factor=reduction_factor)
  if name == "none":
    return pruners.NopPruner()
  raise SweepError(f"--pruner={name}: one of {PRUNERS}")


def _start_ticks(pid: int) -> int | None:
  """A process's start time (Linux /proc; None elsewhere), so that a reused pid is not alive."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return -1 if fields[0] == "Z" else int(fields[19])   # -1: a zombie (it has exited)
  except (OSError, IndexError, ValueError):
    return None


def _alive(pid: int, start: int | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  now = _start_ticks(pid)
  return now != -1 and (start is None or now is None or now == start)


def identity() -> dict:
  """Who runs a trial: recorded in its user attributes."""
  return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_ticks(os.getpid())}


def _fs_now(study_dir: str) -> float:
  """The current time as the shared disk sees it (immune to clock skew between hosts)."""
  path = os.path.join(study_dir, ".clock")
  with open(path, "a"):
    os.utime(path, None)
  return os.stat(path).st_mtime


def _heartbeat_path(study_dir: str, number: int) -> str:
  return os.path.join(study_dir, "trials", str(number), "heartbeat")


def stale_reason(trial, study_dir: str, stale_after_s: float, now: float) -> str | None:
  """Why a RUNNING trial's process is known or presumed dead, or None while it may be alive."""
  attrs = trial.user_attrs
  if attrs.get("host") == socket.gethostname() and "pid" in attrs:
    if not _alive(attrs["pid"], attrs.get("pid_start")):
      return f"its process {attrs['host']}:{attrs['pid']} is gone"
    return None
  try:
    last = os.stat(_heartbeat_path(study_dir, trial.number)).st_mtime
  except OSError:
    last = trial.datetime_start.timestamp() if trial.datetime_start else now
  if now - last > stale_after_s:
    return f"no heartbeat for {now - last:.0f} s"
  return None


def _fail_and_requeue(study, trial, reason: str) -> bool:
  """Marks a RUNNING trial FAIL and queues its parameters again; False if another worker did."""
  from optuna.exceptions import UpdateFinishedTrialError
  from optuna.trial import TrialState
  storage = study._storage   # as Optuna's own RetryFailedTrialCallback does
  try:
    storage.set_trial_user_attr(trial._trial_id, "stop_reason", f"redone: {reason}")
    storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
  except UpdateFinishedTrialError:   # another worker was first
    return False
  study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.user_attrs.get(
      "retry_of", trial.number)})
  return True


def fail_stale(study, study_dir: str, stale_after_s: float) -> list[int]:
  """Marks the RUNNING trials of dead processes FAIL and queues them again (under the lock)."""
  from optuna.trial import TrialState
  now = _fs_now(study_dir)
  redone = []
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    reason = stale_reason(t, study_dir, stale_after_s, now)
    if reason and _fail_and_requeue(study, t, reason):
      print(f"trial {t.number} was left RUNNING ({reason}): marked FAIL, queued again", flush=True)
      redone.append(t.number)
  return redone


def counts(study) -> dict[str, int]:
  from optuna.trial import TrialState
  out = {s.name: 0 for s in TrialState}
  for t in study.get_trials(deepcopy=False):
    out[t.state.name] += 1
  return out


def claim(study, study_dir: str, total: int, space: list[Param], sampler: str, seed: int | None,
          stale_after_s: float, who: dict | None = None):
  """The next trial to run (a queued one first), or None when the study has `total` finished
  (COMPLETE + PRUNED) and running trials. Stale trials are redone first."""
  with _locked(study_dir):
    fail_stale(study, study_dir, stale_after_s)
    n = counts(study)
    if n["COMPLETE"] + n["PRUNED"] + n["RUNNING"] >= total:
      return None
    study.sampler = make_sampler(sampler, seed, sum(n.values()))
    trial = study.ask({p.name: p.distribution for p in space})
    for key, value in {**(who or identity()), "sampler": sampler}.items():
      trial.set_user_attr(key, value)
    os.makedirs(os.path.dirname(_heartbeat_path(study_dir, trial.number)), exist_ok=True)
    open(_heartbeat_path(study_dir, trial.number), "a").close()
    return trial


class Heartbeat:
  """Touches a trial's heartbeat file every `every` seconds while the trial runs."""

  def __init__(self, path: str, every: float):
    self.path, self.every = path, every
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.wait(self.every):
      with contextlib.suppress(OSError):
        os.utime(self.path, None)

  def __enter__(self):
    with contextlib.suppress(OSError):
      os.utime(self.path, None)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


# ---------------------------------------------------------------------------------------------
# Running trials.


@dataclasses.dataclass
class Options:
  """What `python -m v1t_jax.sweep` was asked to do (the flags)."""
  study_dir: str
  trials: int
  config: str                      # "configs/x.py" or "configs/x.py:arg"
  space: str                       # "sweeps/y.py"
  overrides: list[str] = dataclasses.field(default_factory=list)   # fixed --config.x=v
  sampler: str = "tpe"
  seed: int | None = 0
  pruner: str = "median"
  prune_after_epochs: int = 10
  prune_startup_trials: int = 5
  reduction_factor: int = 3
  workers: int = 0                 # 0: one per GPU, or 1 without GPUs
  heartbeat_s: float = 30.0
  stale_after_s: float = 600.0
  max_failures: int = 3
  child: bool = False              # one of --workers processes: no report
  compilation_cache: str | None = None   # the folder resolved by the parent ('' = off)


def _diverged(error: Exception) -> bool:
  return isinstance(error, RuntimeError) and str(error).startswith(
      "training stopped before any epoch finished well")


def run_trial(study, trial, opts: Options, space: list[Param], base, train_fn=None) -> str:
  """Trains one trial in `trials/<number>/`, reporting every epoch; returns its final state."""
  from optuna.exceptions import UpdateFinishedTrialError
  from optuna.trial import TrialState

  from data_prep import prepare
  from v1t_jax import train
  train_fn = train_fn or train.train_and_evaluate
  tokens = trial_overrides(trial.params, space, base)
  trial.set_user_attr("overrides", tokens)
  workdir = os.path.join(opts.study_dir, "trials", str(trial.number))
  print(f"trial {trial.number} ({' '.join(t[len('--config.'):] for t in tokens)}): {workdir}",
        flush=True)
  epochs = []

  def on_epoch(epoch: int, val: dict) -> bool:
    try:
      trial.report(float(val["single_trial_correlation_average"]), epoch)
    except UpdateFinishedTrialError:   # another worker took it for dead and queued it again
      return True
    epochs.append(epoch)
    return trial.should_prune()

  def finish(state, value=None, **attrs) -> str:
    try:
      for key, v in attrs.items():
        trial.set_user_attr(key, v)
      study.tell(trial, value, state=state)
    except UpdateFinishedTrialError:
      print(f"trial {trial.number} was taken for dead by another worker and queued again; "
            f"its run stays in {workdir}", flush=True)
      return "FAIL"
    return state.name if state is not None else "COMPLETE"

  started = time.time()
  try:
    with Heartbeat(_heartbeat_path(opts.study_dir, trial.number), opts.heartbeat_s):
      config = load_config(opts.config, opts.overrides + tokens)
      prepare.ensure_dataset(config)
      result = train_fn(config, workdir, on_epoch=on_epoch)
  except KeyboardInterrupt:   # Ctrl-C / SIGTERM: the trial is redone by the next run
    _fail_and_requeue(study, study._storage.get_trial(trial._trial_id), "interrupted")
    raise
  except Exception as e:   # noqa: BLE001  a failed trial must not end the other trials
    reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    state = TrialState.PRUNED if _diverged(e) else TrialState.FAIL   # diverged: a bad region
    print(f"trial {trial.number} {state.name}: {reason}", flush=True)
    return finish(state, stop_reason=reason[:500], epochs=len(epochs))
  finally:
    _clear_caches()
  best = float(result["validation"]["single_trial_correlation_average"])
  if result.get("stop_reason") == "pruned":
    state, value = TrialState.PRUNED, None
  elif math.isfinite(best):
    state, value = None, best   # COMPLETE
  else:
    state, value = TrialState.FAIL, None
  state = finish(state, value, best_val_corr=best, epochs=len(epochs),
                 stop_reason=result.get("stop_reason", ""))
  print(f"trial {trial.number} {state} after {len(epochs)} epochs: best {OBJECTIVE} "
        f"{best:.4f} ({time.time() - started:.0f} s)", flush=True)
  return state


def _clear_caches():
  import gc

  import jax
  jax.clear_caches()   # each trial jits its own programs; do not keep them all
  gc.collect()


def check_study(study, opts: Options, space_dict: dict):
  """Records the sweep's config, overrides and space in a new study; a later command must
  match them (the same sweep), except sampler and pruner, which may change between runs."""
  record = {"config": opts.config, "overrides": list(opts.overrides), "space_file": opts.space,
            "space": json.loads(json.dumps(space_dict))}
  attrs = study.user_attrs
  if "config" not in attrs:
    for key, value in record.items():
      study.set_user_attr(key, value)
    return
  flag = {"config": "--config", "overrides": "--config.*", "space": "--space"}
  for key, value in record.items():
    if key in flag and attrs.get(key) != value:   # the space file may move; its content not
      raise SweepError(f"{flag[key]}: {value!r} differs from the study's {attrs.get(key)!r} "
                       f"({opts.study_dir}); run the same command, or use another --study_dir")


def work(opts: Options, train_fn=None) -> dict[str, int]:
  """One worker: claims and trains trials until the study has `opts.trials` of them finished.
  Waits while only other workers' trials run (they may die and need redoing)."""
  base = load_config(opts.config, opts.overrides)
  space_dict, space = load_space(opts.space, base)
  study = open_study(opts.study_dir, create=True)
  with _locked(opts.study_dir):
    check_study(study, opts, space_dict)
  study.pruner = make_pruner(opts.pruner, opts.prune_after_epochs, opts.prune_startup_trials,
                             opts.reduction_factor, base.train.num_epochs)
  failures, wait = 0, 1.0
  ran = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
  while True:
    trial = claim(study, opts.study_dir, opts.trials, space, opts.sampler, opts.seed,
                  opts.stale_after_s)
    if trial is None:
      n = counts(study)
      if n["COMPLETE"] + n["PRUNED"] >= opts.trials or not n["RUNNING"]:
        return ran
      time.sleep(wait)   # only others' trials run: wait, they may die and need redoing
      wait = min(2 * wait, 30.0)
      continue
    wait = 1.0
    state = run_trial(study, trial, opts, space, base, train_fn)
    ran[state] += 1
    failures = failures + 1 if state == "FAIL" else 0
    if failures >= opts.max_failures:
      raise SweepError(f"{failures} trials in a row failed (last: trial {trial.number}, "
                       f"{study.trials[trial.number].user_attrs.get('stop_reason')}); stopping")


# ---------------------------------------------------------------------------------------------
# Several workers on one machine.


def gpu_ids() -> list[str]:
  """This machine's GPUs (CUDA_VISIBLE_DEVICES if set, else nvidia-smi), without starting JAX."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.SubprocessError):
    return []
  return out.stdout.split() if out.returncode == 0 else []


def worker_envs(workers: int, gpus: list[str]) -> list[dict]:
  """Environment changes of each worker: its own GPU(s) when there are several; workers that
  must share a GPU get an equal slice of its memory instead of JAX's 75 % preallocation."""
  if not gpus:
    return [{} for _ in range(workers)]
  if workers <= len(gpus):
    groups = [gpus[i * len(gpus) // workers:(i + 1) * len(gpus) // workers]
              for i in range(workers)]
    return [{"CUDA_VISIBLE_DEVICES": ",".join(g)} for g in groups]
  share = math.ceil(workers / len(gpus))
  return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)],
           "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / share:.2f}"} for i in range(workers)]


def child_command(opts: Options) -> list[str]:
  args = [f"--config={opts.config}", *opts.overrides, f"--space={opts.space}",
          f"--study_dir={opts.study_dir}", f"--trials={opts.trials}", f"--sampler={opts.sampler}",
          f"--pruner={opts.pruner}", f"--prune_after_epochs={opts.prune_after_epochs}",
          f"--prune_startup_trials={opts.prune_startup_trials}",
          f"--reduction_factor={opts.reduction_factor}", f"--heartbeat_s={opts.heartbeat_s}",
          f"--stale_after_s={opts.stale_after_s}", f"--max_failures={opts.max_failures}",
          "--workers=1", "--child"]
  if opts.seed is not None:
    args.append(f"--seed={opts.seed}")
  if opts.compilation_cache is not None:
    args.append(f"--compilation_cache={opts.compilation_cache}")
  return [sys.executable, "-m", "v1t_jax.sweep", *args]


def run_workers(opts: Options, workers: int, gpus: list[str]) -> int:
  """Starts `workers` processes on this study (logs in study_dir/logs/), prints each trial as
  it finishes and returns the number of workers that failed."""
  logs = os.path.join(opts.study_dir, "logs")
  os.makedirs(logs, exist_ok=True)
  host = socket.gethostname()
  procs = []
  for i, env in enumerate(worker_envs(workers, gpus)):
    log = open(os.path.join(logs, f"{host}-worker{i}.log"), "a")
    # Own session: a Ctrl-C reaches only this process, which passes it on once (below).
    procs.append((subprocess.Popen(child_command(opts), env={**os.environ, **env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True), log, env))
    gpu = f", GPU {env['CUDA_VISIBLE_DEVICES']}" if env else ""
    print(f"worker {i} (pid {procs[-1][0].pid}{gpu}): log in {log.name}", flush=True)
  study = open_study(opts.study_dir, create=True)
  seen = set()
  try:
    while True:
      done = all(p.poll() is not None for p, _, _ in procs)
      for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and t.number not in seen:
          seen.add(t.number)
          value = t.user_attrs.get("best_val_corr")
          print(f"trial {t.number} {t.state.name}"
                + (f": best {OBJECTIVE} {value:.4f}" if value is not None else "")
                + f" ({t.user_attrs.get('host')}:{t.user_attrs.get('pid')})", flush=True)
      if done:
        break
      running = next((p for p, _, _ in procs if p.poll() is None), None)
      try:   # up to 2 s, less when a worker ends (its last trial is printed at once)
        if running is not None:
          running.wait(timeout=2.0)
      except subprocess.TimeoutExpired:
        pass
  except KeyboardInterrupt:
    for p, _, _ in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGINT)
    for p, _, _ in procs:
      p.wait()
    raise
  failed = 0
  for i, (p, log, _) in enumerate(procs):
    log.close()
    if p.returncode:
      failed += 1
      print(f"worker {i} exited with {p.returncode}; see {log.name}", flush=True)
  return failed


def sweep(opts: Options, train_fn=None) -> dict:
  """`python -m v1t_jax.sweep`: validates, runs the trials (in this process or in workers) and,
  unless a child worker, prints and writes the report."""
  if opts.trials < 1:
    raise SweepError(f"--trials={opts.trials}: must be >= 1 (the study's total)")
  if opts.workers < 0:
    raise SweepError(f"--workers={opts.workers}: must be >= 0 (0: one per GPU)")
  if opts.sampler not in SAMPLERS:
    raise SweepError(f"--sampler={opts.sampler}: one of {SAMPLERS}")
  if opts.pruner not in PRUNERS:
    raise SweepError(f"--pruner={opts.pruner}: one of {PRUNERS}")
  base = load_config(opts.config, opts.overrides)
  space_dict, space = load_space(opts.space, base)
  fixed = {t.split("=", 1)[0][len("--config."):] for t in opts.overrides}
  both = sorted(fixed & {p.name for p in space})
  if both:
    raise SweepError(f"--config.{both[0]} is fixed on the command line and searched by "
                     f"--space={opts.space}; drop one")
  gpus = [] if opts.child else gpu_ids()
  workers = opts.workers or max(1, len(gpus))
  if workers > 1 and not gpus and not opts.child:
    print(f"{workers} workers share this machine's CPUs (no GPU found)", flush=True)
  # SIGTERM (e.g. SLURM preemption) as Ctrl-C: the running trials are queued again.
  main_thread = threading.current_thread() is threading.main_thread()
  handler = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
  try:
    if workers == 1:
      if len(gpus) > 1 and not opts.child:
        print(f"1 worker on {len(gpus)} GPUs (--workers={len(gpus)} runs one trial per GPU)")
      work(opts, train_fn)
    else:
      from data_prep import prepare
      prepare.ensure_dataset(base)   # once, before the workers (a synthetic config makes it)
      if run_workers(opts, workers, gpus):
        raise SweepError(f"some workers failed; their logs are in {opts.study_dir}/logs")
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, handler)
  if opts.child:
    return {}
  return report(opts.study_dir)


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# The report.


def _fmt(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def best_command(study, study_dir: str) -> list[str] | None:
  """`python launch_train.py ...` that retrains the best COMPLETE trial, or None."""
  from optuna.trial import TrialState
  complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  if not complete:
    return None
  best = max(complete, key=lambda t: t.value)
  attrs = study.user_attrs
  return ["python", "launch_train.py", f"--config={attrs.get('config')}",
          f"--workdir={os.path.join(study_dir, 'best_run')}", *attrs.get("overrides", []),
          *best.user_attrs.get("overrides", [])]


def report(study_dir: str) -> dict:
  """Prints the trials table and the best command; writes trials.csv, history.png and
  importances.png (or says why a figure was skipped). Returns what it printed, as data."""
  study = open_study(study_dir)
  trials = study.get_trials(deepcopy=False)
  names = list(dict.fromkeys(n for t in trials for n in t.params))
  space = study.user_attrs.get("space", {})

  def label(name):   # a `times` param is the factor, not the field's value
    times = space.get(name, {}).get("times") if isinstance(space.get(name), dict) else None
    return name if times is None else f"{name} (x {times})"

  header = ["number", "state", "best_val_corr", "epochs", *map(label, names), "stop_reason",
            "retry_of", "worker", "sampler", "duration_s"]
  rows = []
  for t in trials:
    a = t.user_attrs
    duration = ((t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start else None)
    rows.append([t.number, t.state.name, a.get("best_val_corr"), a.get("epochs"),
                 *[t.params.get(n) for n in names], a.get("stop_reason", ""), a.get("retry_of"),
                 f"{a['host']}:{a['pid']}" if "host" in a else "", a.get("sampler", ""),
                 None if duration is None else round(duration, 1)])
  with open(os.path.join(study_dir, "trials.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
  n = counts(study)
  print(f"study {study_dir}: {len(trials)} trials ({n['COMPLETE']} complete, {n['PRUNED']} "
        f"pruned, {n['FAIL']} failed, {n['RUNNING']} running, {n['WAITING']} queued); "
        f"objective: best {OBJECTIVE}")
  shown = header[:4 + len(names)]
  table = [shown] + [[_fmt(v) for v in row[:len(shown)]] for row in rows]
  widths = [max(len(r[i]) for r in table) for i in range(len(shown))]
  for r in table:
    print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
  out = {"trials": len(trials), "counts": n, "csv": os.path.join(study_dir, "trials.csv")}
  command = best_command(study, study_dir)
  if command:
    best = study.best_trial
    print(f"best: trial {best.number}, {OBJECTIVE} {best.value:.4f}; retrain it with")
    print("  " + " ".join(shlex.quote(c) for c in command))
    out.update(best=best.number, best_value=best.value, command=command)
  else:
    print("best: none yet (no COMPLETE trial)")
  out["figures"] = _figures(study, study_dir)
  return out


def _figures(study, study_dir: str) -> dict[str, str]:
  """history.png and importances.png; a figure that cannot be made is skipped with a reason."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from optuna.trial import TrialState
  from optuna.visualization import matplotlib as plots
  complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  varying = [n for n in {n for t in complete for n in t.params}
             if len({json.dumps(t.params.get(n)) for t in complete}) > 1]
  made = {}
  jobs = {"history.png": (plots.plot_optimization_history,
                          None if complete else "no COMPLETE trial yet"),
          "importances.png": (plots.plot_param_importances,
                              f"needs >= 2 COMPLETE trials, has {len(complete)}"
                              if len(complete) < 2 else
                              None if varying else "no parameter varies across COMPLETE trials")}
  for name, (plot, skip) in jobs.items():
    path = os.path.join(study_dir, name)
    if skip is None:
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")   # optuna's ExperimentalWarning for these plots
          ax = plot(study)
        fig = getattr(ax, "figure", None) or ax.flat[0].figure
        if name == "history.png":
          ax.set_ylabel(f"best {OBJECTIVE}")
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made[name] = path
        continue
      except (ValueError, RuntimeError, ZeroDivisionError) as e:
        skip = f"{type(e).__name__}: {e}"
    print(f"{name} skipped: {skip}")
  if made:
    print("wrote " + ", ".join([os.path.join(study_dir, "trials.csv"), *made.values()]))
  return made


# ---------------------------------------------------------------------------------------------
# Command line.

def define_flags():
  """The command's flags; defined only when run as a script, since other modules of the project
  (v1t_jax.summary) define a --config flag too."""
  config_flags.DEFINE_config_file("config", None, "config file (as launch_train.py)",
                                  lock_config=True)
  flags.DEFINE_string("space", None, "search space file, e.g. sweeps/v1t.py")
  flags.DEFINE_string("study_dir", None, "the study's directory (shared by all workers)")
  flags.DEFINE_integer("trials", None, "the study's total number of finished trials")
  flags.DEFINE_integer("workers", 0, "processes on this machine (0: one per GPU, or 1 without)")
  flags.DEFINE_enum("sampler", "tpe", SAMPLERS, "qmc: quasi-random exploration; tpe: Bayesian "
                    "exploitation")
  flags.DEFINE_integer("seed", 0, "sampler seed")
  flags.DEFINE_enum("pruner", "median", PRUNERS, "early stopping of poor trials")
  flags.DEFINE_integer("prune_after_epochs", 10, "no pruning before this epoch (median: warm-up; "
                       "halving/hyperband: min resource)")
  flags.DEFINE_integer("prune_startup_trials", 5, "median: COMPLETE trials before any pruning")
  flags.DEFINE_integer("reduction_factor", 3, "halving/hyperband reduction factor")
  flags.DEFINE_float("heartbeat_s", 30.0, "seconds between a running trial's heartbeats")
  flags.DEFINE_float("stale_after_s", 600.0, "a RUNNING trial of another host without heartbeat "
                     "for this long is redone")
  flags.DEFINE_integer("max_failures", 3, "a worker stops after this many failed trials in a row")
  flags.DEFINE_bool("report", False, "only print the report of --study_dir")
  flags.DEFINE_bool("child", False, "internal: one of the --workers processes")
  flags.DEFINE_string("compilation_cache", None, cli.CACHE_HELP)


def config_args(argv: list[str]) -> tuple[str | None, list[str]]:
  """`--config=ref` and the `--config.x=v` overrides as written on the command line."""
  ref, overrides = None, []
  i = 1
  while i < len(argv):
    arg = "--" + argv[i].lstrip("-") if argv[i].startswith("-") else argv[i]
    if arg == "--config" or arg.startswith("--config.") and "=" not in arg:
      value = argv[i + 1] if i + 1 < len(argv) else ""
      i += 1
      arg = f"{arg}={value}"
    if arg.startswith("--config="):
      ref = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      overrides.append(arg)
    i += 1
  return ref, overrides


def main(argv):
  if len(argv) > 1:
    _fail(f"usage error: unexpected argument {argv[1]!r} (flags are --name=value; see --help)")
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    if not f.study_dir:
      raise SweepError("--study_dir is required")
    if f.report:
      given = [f"--{n}" for n in ("config", "space", "trials") if f[n].present]
      if given:
        raise SweepError(f"--report takes only --study_dir (got {', '.join(given)})")
      report(f.study_dir)
      return
    for name in ("config", "space", "trials"):
      if not f[name].present:
        raise SweepError(f"--{name} is required (or --report for the report alone)")
    try:   # trials of the same shapes compile once per machine
      cache = cli.compilation_cache(f.compilation_cache)
    except ValueError as e:
      raise SweepError(str(e)) from None
    config_ref, overrides = config_args(sys.argv)
    sweep(Options(study_dir=f.study_dir, trials=f.trials, config=config_ref, space=f.space,
                  overrides=overrides, sampler=f.sampler, seed=f.seed, pruner=f.pruner,
                  prune_after_epochs=f.prune_after_epochs,
                  prune_startup_trials=f.prune_startup_trials,
                  reduction_factor=f.reduction_factor, workers=f.workers,
                  heartbeat_s=f.heartbeat_s, stale_after_s=f.stale_after_s,
                  max_failures=f.max_failures, child=f.child,
                  compilation_cache=cache or ""))
  except SweepError as e:
    _fail(f"error: {e}")
  except KeyboardInterrupt:
    _fail("interrupted: the running trials are queued again; the same command resumes", 130)


def _fail(message: str, code: int = 2):
  print(f"v1t_jax.sweep: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


if __name__ == "__main__":
  define_flags()
  app.run(main)
