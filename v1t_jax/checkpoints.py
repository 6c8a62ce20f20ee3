"""Run state and its checkpoints: the state dict of a split model, orbax save and restore,
resume checks (damaged checkpoints moved aside, changed settings named), the workdir lock.

State is a plain dict {params, buffers, opt_state, step} of the split NNX model. No NaN/inf state
is ever saved (callers check `state_is_finite` before every save); RunError carries one-line
messages that launch_train prints instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from v1t_jax.model import ModelConfig, abstract_model
from v1t_jax.progress import say


class RunError(RuntimeError):
  """A run that cannot go on, with a one-line message for the user (launch_train exits with it)."""


class NonFiniteError(RunError):
  """Training reached NaN/inf values before any epoch finished well; nothing of them was saved."""


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite: one reduction on device."""
  flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(flags).all() if flags else jnp.bool_(True)


def state_is_finite(state: dict) -> bool:
  """Whether the parameters and the optimizer state hold only finite values (checked before
  every save, so that no NaN state ever becomes a checkpoint)."""
  return bool(all_finite((state["params"], state["opt_state"])))


def split_model(model: nnx.Module):
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  return graphdef, params, buffers


def new_state(model: nnx.Module, tx: optax.GradientTransformation) -> dict:
  _, params, buffers = split_model(model)
  # Strong dtypes everywhere: a weakly typed init (e.g. jnp.full(..., 1 / C)) would come back
  # strongly typed from the first step and force a second compilation.
  params, buffers = jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype),
                                 (params, buffers))
  return {"params": params, "buffers": buffers, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32)}


def make_optimizer_for_restore() -> optax.GradientTransformation:
  """The optimizer-state layout of every run (Adam at unit lr), for restoring its checkpoint."""
  return optax.adam(1.0)


def pretrained_core(run_dir: str, graphdef, abstract_params) -> nnx.State:
  """The core parameters of another run's best checkpoint (same core shape required)."""
  manager = ocp.CheckpointManager(run_path(run_dir) / "best")
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"train.pretrain_core={run_dir}: no checkpoint in {run_dir}/best")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  run = meta.get("run", {})
  if not run:
    raise ValueError(f"train.pretrain_core={run_dir}: its checkpoint does not record its config")
  # Rebuild that run's model abstractly (its own mice and neuron counts) to restore its state.
  model = abstract_model(ModelConfig.from_config(run["config"]["model"]),
                         [m["neurons"] for m in run["mice"]], run["image_hwc"])
  target = jax.eval_shape(lambda: new_state(model, make_optimizer_for_restore()))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target))).state
  manager.close()
  core = restored["params"]["core"]
  want = jax.tree.map(lambda a: a.shape, abstract_params["core"])
  got = jax.tree.map(lambda a: a.shape, core)
  if want != got:
    raise ValueError(f"train.pretrain_core={run_dir}: its core has other shapes than this "
                     "config's (emb_dim, num_heads, num_blocks, mlp_dim, patches and behaviour "
                     "mode must match)")
  return core


def run_path(workdir: str) -> epath.Path:
  """A run directory as a path orbax and the writers accept: local (made absolute) or gs://."""
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def checkpoint_managers(workdir: str, create: bool = True):
  """The managers of `<workdir>/checkpoints` (2 kept) and `<workdir>/best` (1 kept); with
  create=False they make no folders (evaluation)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=create)
  latest = ocp.CheckpointManager(run_path(workdir) / "checkpoints", options=options)
  best = ocp.CheckpointManager(run_path(workdir) / "best",
                               options=ocp.CheckpointManagerOptions(max_to_keep=1, create=create))
  return latest, best


def save(manager: ocp.CheckpointManager, state: dict, meta: dict):
  step = int(meta["step"])
  if step in manager.all_steps():
    # A run killed between its two managers' saves redoes that step: the new save replaces it.
    manager.wait_until_finished()
    manager.delete(step)
  manager.save(int(meta["step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def restore(manager: ocp.CheckpointManager, trainer, step: int | None = None):
  step = manager.latest_step() if step is None else step
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        trainer.abstract_state, trainer.state_sharding)
  r = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return r.state, r.meta


def one_line(error: BaseException) -> str:
  """An exception as `Type: first line` (orbax and tensorstore errors run to many lines)."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


# Fields that define what one step is: the step counter, the epoch boundaries (step / steps per
# epoch), the lr decay and the position in the data order all count batches of this size.
STEP_FIELDS = ("data.batch_size", "data.limit_data", "train.max_steps_per_epoch")


def _changes(changed: dict, keys=None) -> str:
  return ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in keys or changed)


def resume_changes(meta: dict, config, where) -> dict:
  """{field: (checkpoint's value, this config's)} where this config differs from the one the
  checkpoint recorded (meta["run"]["config"]; {} for checkpoints without it).

  Raises RunError where a resume cannot continue the run: STEP_FIELDS (another batch size would
  count steps and epochs in other units and resume elsewhere in the data).
  """
  saved = meta.get("run", {}).get("config")
  if not saved:
    return {}
  saved, now = flat(saved), flat(json.loads(config.to_json_best_effort()))
  missing = "(none)"
  changed = {k: (saved.get(k, missing), now.get(k, missing))
             for k in sorted(set(saved) | set(now)) if saved.get(k, missing) != now.get(k, missing)}
  step = [k for k in STEP_FIELDS if k in changed]
  if step:
    raise RunError(f"{where} was trained with other step settings ({_changes(changed, step)}): "
                   "its step counter, epoch boundaries and data position count those batches, so "
                   "this run would not continue it; resume with the checkpoint's values or use "
                   "another --workdir")
  return changed


def restore_newest_intact(manager: ocp.CheckpointManager, trainer,
                          workdir: str) -> tuple[dict, dict] | None:
  """The newest checkpoint of `manager` that restores completely with finite values, or None
  when there is none at all.

  A damaged one (a file missing or truncated, its metadata gone, NaN/inf values) is named and,
  once an older one has restored, moved to `<workdir>/damaged_checkpoints/<step>`: never
  deleted, and out of orbax's way (its next save of that step, or its pruning, would delete it).
  Raises RunError, moving nothing, when every checkpoint is damaged, and when this config
  differs from the checkpoint's in the model (naming the fields) or in STEP_FIELDS; other
  differences (lr, epochs, ...) are printed in one line.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001  orbax, tensorstore and json raise many types
      damaged.append((step, one_line(e)))
      continue
    changed = resume_changes(meta, trainer.config, manager.directory / str(step))
    try:
      state, meta = restore(manager, trainer, step)
    except Exception as e:  # noqa: BLE001  another model, or damage
      model = [k for k in changed if k.startswith("model.") or k == "data.mice"]
      if model:   # not damage: the checkpoint holds another model
        raise RunError(f"{manager.directory / str(step)} holds another model than this config "
                       f"({_changes(changed, model)}); resume with the checkpoint's values or "
                       "use another --workdir") from None
      damaged.append((step, one_line(e)))
      continue
    if not state_is_finite(state):
      damaged.append((step, "it holds NaN/inf values"))
      continue
    if changed:
      say(f"resuming with settings other than the checkpoint's: {_changes(changed)}")
    break
  else:
    if not damaged:
      return None
    listed = "; ".join(f"{manager.directory / str(s)}: {why}" for s, why in damaged)
    raise RunError(f"no intact checkpoint to resume from ({listed}); move them away to start "
                   "afresh, or use another --workdir")
  aside = run_path(workdir) / "damaged_checkpoints"
  for bad, why in damaged:
    target = aside / str(bad)
    n = 1
    while target.exists():
      target, n = aside / f"{bad}-{n}", n + 1
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      (manager.directory / str(bad)).rename(target)
    say(f"checkpoint {manager.directory / str(bad)} is damaged ({why}); moved it to {target} "
         f"and resuming from step {step}")
  if damaged:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("damaged checkpoints moved")
    manager.reload()
  return state, meta


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """An exclusive lock on `<workdir>/.lock` for the duration of a run: a second trainer on the
  same workdir stops with RunError instead of both crashing in orbax.

  fcntl.flock, taken by process 0 on local workdirs (gs:// ones are not locked): the kernel
  releases it when the process ends, even by SIGKILL, so a lock file left behind is never stale.
  """
  if "://" in workdir:
    yield
    return
  held, holder, lock = True, "", None
  if jax.process_index() == 0:
    import fcntl
    import socket
    os.makedirs(workdir, exist_ok=True)
    # Held open across the yield (closing it releases the lock), so no `with`.
    lock = open(os.path.join(os.path.abspath(workdir), ".lock"), "a+")  # noqa: SIM115
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      lock.seek(0)
      lock.truncate()
      lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
      lock.flush()
    except BlockingIOError:
      lock.seek(0)
      holder = lock.read().strip()
      lock.close()
      held, lock = False, None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    held = bool(multihost_utils.broadcast_one_to_all(np.bool_(held)))
  if not held:
    raise RunError(f"{workdir} is in use by another training run ({holder or 'on process 0'}); "
                   "wait for it to end, or use another --workdir")
  try:
    yield
  finally:
    if lock is not None:
      lock.close()   # closing releases the lock


def last_good(latest: ocp.CheckpointManager, workdir: str) -> str:
  """Names the newest checkpoint on disk (the one a rerun resumes from), or says there is none."""
  steps = latest.all_steps()
  if not steps:
    return f"no checkpoint in {run_path(workdir) / 'checkpoints'} yet"
  return f"the last good checkpoint is {run_path(workdir) / 'checkpoints' / str(max(steps))}"


def run_meta(step: int, epoch: int, plateau, val: dict | None = None,
          run: dict | None = None, epoch_sums: dict | None = None) -> dict:
  meta = {"step": step, "epoch": epoch, "plateau": plateau.state(), "run": run or {}}
  if val is not None:
    meta["validation"] = val
  if epoch_sums is not None:
    meta["epoch_sums"] = epoch_sums
  return meta


def flat(config, prefix: str = "") -> dict:
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def require_checkpoint(config, workdir: str):
  """RunError (one line) unless `--mode=evaluate` has its checkpoint: the best one, or
  `config.eval.step` of the latest ones. Makes no folder and reads no data."""
  folder = run_path(workdir) / ("best" if config.eval.step is None else "checkpoints")
  steps = []
  if folder.exists():
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
  if not steps:
    raise RunError(f"--mode=evaluate: no checkpoint in {folder} (train first with --mode=train, "
                   "or check --workdir)")
  if config.eval.step is not None and config.eval.step not in steps:
    raise RunError(f"--config.eval.step={config.eval.step}: no such checkpoint in {folder} "
                   f"(there: {', '.join(map(str, steps))})")



def stacked(abstract_state, members: int):
  """The abstract state of an ensemble: a leading member axis on every leaf (1: unchanged)."""
  if members == 1:
    return abstract_state
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((members,) + a.shape, a.dtype),
                      abstract_state)
