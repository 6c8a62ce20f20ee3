"""Training and evaluation: one jitted step over a device mesh, orbax checkpoints, plateau rule.

State is a plain dict {params, buffers, opt_state, step} of the split NNX model, replicated over
the `data` mesh axis; batches `[M, B, ...]` are sharded on B. One optimizer update per stacked
batch reproduces the original's "accumulate one batch of every mouse, then step" (§8.2).
After every epoch the validation single-trial correlation drives the original's plateau rule
(§8.4), checkpoints go to `<workdir>/checkpoints` (latest, every epoch and every
`checkpoint_every_steps`) and `<workdir>/best` (best validation correlation).

What users type works or fails loudly: no NaN/inf state is ever saved (checked before every
save), a resume skips (and moves aside) damaged checkpoints and names config fields that cannot
change, a workdir takes one trainer at a time, and RunError carries one-line messages that
launch_train prints instead of a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from v1t_jax import dataset_meta, losses, metrics
from v1t_jax.model import V1T, ModelConfig
from v1t_jax.plateau import Action, Plateau

MODEL_INPUTS = ("image", "behavior", "pupil_center", "responses", "valid")


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


# ---------------------------------------------------------------------------------------------
# Model, optimizer and state.


def padded(rows: Sequence[np.ndarray], n_max: int, width: int | None = None) -> np.ndarray:
  """Stack per-mouse arrays of different lengths, zero-padded to n_max rows."""
  shape = (len(rows), n_max) + (() if width is None else (width,))
  out = np.zeros(shape, np.float32)
  for m, r in enumerate(rows):
    out[m, : len(r)] = r
  return out


def model_config(config) -> ModelConfig:
  values = dict(config.model.items())
  if config.train.pretrain_core:   # a frozen core contributes nothing to the regulariser (§7)
    values["core_reg_scale"] = 0.0
  return ModelConfig.from_config(values)


def build_model(config, mice: Sequence[dataset_meta.MouseMeta], image_hwc, seed: int) -> V1T:
  counts = [m.num_neurons for m in mice]
  n_max = max(counts)
  return V1T(
      model_config(config), neuron_counts=counts,
      coordinates=padded([m.coordinates for m in mice], n_max, 3),
      image_shape=tuple(image_hwc),
      response_mean=padded([m.stat("responses", "mean") for m in mice], n_max),
      response_std=padded([m.stat("responses", "std") for m in mice], n_max),
      remat=config.train.get("remat", "none"), rngs=nnx.Rngs(params=seed))


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Adam with the original's betas and eps, no weight decay, no clipping (§8.1), at unit lr.

  The learning rates are applied per parameter group by `scale_updates` (the core may have its
  own lr, or 0 when frozen), times the plateau rule's factor: Adam's update is linear in the lr,
  so this equals one Adam per group, without optax masks in the state.
  """
  return optax.adam(1.0, b1=train_cfg.adam_beta1, b2=train_cfg.adam_beta2, eps=train_cfg.adam_eps)


def scale_updates(updates, lr_scale, *, lr: float, core_lr: float):
  """Multiply each update by its group's learning rate ('core' vs readouts and shifters)."""
  def scale(path, u):
    group_lr = core_lr if getattr(path[0], "key", None) == "core" else lr
    return u * (group_lr * lr_scale)
  return jax.tree_util.tree_map_with_path(scale, updates)


def decay_factor(step: int, total_steps: int, decay_steps: int) -> float:
  """The lr factor of `train.lr_decay_epochs`: 1, then linear to 0 over the last decay_steps.

  Step `s` (0-based) of a run of `total_steps` trains at min(1, (total_steps - s) / decay_steps):
  the last step at 1 / decay_steps. A function of the step only, so a resumed run matches.
  """
  if decay_steps <= 0:
    return 1.0
  return min(1.0, max(0, total_steps - step) / decay_steps)


def group_lrs(train_cfg) -> dict:
  core = 0.0 if train_cfg.pretrain_core else (train_cfg.core_lr or train_cfg.lr)
  return {"lr": float(train_cfg.lr), "core_lr": float(core)}


def split_model(model: V1T):
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  return graphdef, params, buffers


def new_state(model: V1T, tx: optax.GradientTransformation) -> dict:
  _, params, buffers = split_model(model)
  # Strong dtypes everywhere: a weakly typed init (e.g. jnp.full(..., 1 / C)) would come back
  # strongly typed from the first step and force a second compilation.
  params, buffers = jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), (params, buffers))
  return {"params": params, "buffers": buffers, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32)}


# ---------------------------------------------------------------------------------------------
# Steps (module-level pure functions, jitted once with explicit shardings).


def train_step(state, batch, key, lr_scale, *, graphdef, tx, n_train, lrs, microbatches=1):
  """One optimizer update on a [M, B, ...] batch; returns the new state and per-mouse losses.

  microbatches k > 1: gradients of k slices of B/k trials per mouse, accumulated (activation
  memory / k, the same update up to the random draws and float rounding).
  """
  model = nnx.merge(graphdef, state["params"], state["buffers"])
  if microbatches == 1:
    # nnx.value_and_grad differentiates the Params only and keeps the buffers at their trace level
    # (a plain jax.grad over a re-merged model mixes trace levels inside the readouts' nnx.vmap).
    (total, aux), grads = nnx.value_and_grad(
        lambda model: losses.objective(model, batch, n_train, train=True, key=key),
        has_aux=True)(model)
    poisson_M, reg_M = aux["poisson"], aux["reg"]
  else:
    grads, poisson_M, reg_M = accumulated_grads(model, batch, key, n_train, microbatches)
    total = jnp.sum(poisson_M + reg_M)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  updates = scale_updates(updates, lr_scale, **lrs)   # group lr x (plateau factor x decay)
  new = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
             step=state["step"] + 1)
  return new, {"loss": total, "poisson": poisson_M, "reg": reg_M}


def microbatch_slices(batch, microbatches: int):
  """[M, B, ...] arrays -> [k, M, B/k, ...]: slice j holds trials j, j + k, j + 2k, ... (each
  device's share of B stays spread evenly over the slices)."""
  def split(x):
    mice, trials = x.shape[:2]
    if trials % microbatches:
      raise ValueError(f"train.microbatches={microbatches} must divide the batch size {trials}")
    return jnp.moveaxis(x.reshape((mice, trials // microbatches, microbatches) + x.shape[2:]), 2, 0)
  return jax.tree.map(split, batch)


def accumulated_grads(model, batch, key, n_train, microbatches: int):
  """(grads, poisson [M], reg [M]) of the step's objective, its Poisson part summed over
  `microbatches` slices in a lax.scan (ds_scale from the whole step's trials), the
  regulariser's gradient taken once."""
  graphdef, state = nnx.split(model)   # carried through the scan, merged at its trace level

  def poisson(model, micro, key):
    _, aux = losses.objective(model, micro, n_train, train=True, key=key,
                              step_valid=batch["valid"], regularize=False)
    return jnp.sum(aux["poisson"]), aux["poisson"]

  def body(carry, xs):
    grads, poisson_M, state = carry
    micro, j = xs
    (_, micro_M), micro_grads = nnx.value_and_grad(poisson, has_aux=True)(
        nnx.merge(graphdef, state), micro, jax.random.fold_in(key, j))
    return (jax.tree.map(jnp.add, grads, micro_grads), poisson_M + micro_M, state), None

  def regularizer(model):
    reg_M = losses.regularizer(model)
    return jnp.sum(reg_M), reg_M

  (_, reg_M), reg_grads = nnx.value_and_grad(regularizer, has_aux=True)(model)
  (grads, poisson_M, _), _ = jax.lax.scan(
      body, (reg_grads, jnp.zeros_like(reg_M), state),
      (microbatch_slices(batch, microbatches), jnp.arange(microbatches)))
  return grads, poisson_M, reg_M


def eval_step(params, buffers, batch, *, graphdef, n_train):
  """Eval-mode losses and correlation sums of one batch (padding rows masked)."""
  model = nnx.merge(graphdef, params, buffers)
  _, aux = losses.objective(model, batch, n_train, train=False)
  return {"poisson": aux["poisson"], "pred": aux["pred"],
          "corr_sums": metrics.correlation_sums(aux["pred"], batch["responses"], batch["valid"])}


def state_spec(path, leaf, mesh: jax.sharding.Mesh) -> P:
  """Replicated, except the readouts' per-neuron arrays [M, N_max, ...] (and their Adam moments)
  on a mesh with a `neurons` axis of size > 1: split along N_max there."""
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  shards = dict(zip(mesh.axis_names, mesh.devices.shape)).get("neurons", 1)
  if shards == 1 or "readouts" not in keys or "grid_predictor" in keys or leaf.ndim < 2:
    return P()
  if leaf.shape[1] % shards:
    raise ValueError(f"mesh.neuron_shards={shards} must divide the largest mouse's neuron count "
                     f"({leaf.shape[1]}); choose a divisor or 1")
  return P(None, "neurons")


PROGRESS_EVERY_S = 30.0   # default of `train.progress_every_s` (a config may set it)


class Progress:
  """A progress line every `every_s` seconds (process 0) while a loop runs: how far, the rate
  since the start and the time left, e.g.
  `epoch 3/17: step 40/106 (38%), 3.85 steps/s, ETA 0:00:17`. Nothing before `every_s` has
  passed, so short loops print nothing and logs are not flooded."""

  def __init__(self, what: str, total: int, unit: str = "step", done: int = 0,
               every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic):
    self.what, self.total, self.unit, self.every_s, self.clock = what, total, unit, every_s, clock
    self.start_done = done
    self.start = self.last = clock()

  def __call__(self, done: int, wait_for=None) -> bool:
    """Prints the line if it is due (after blocking on `wait_for`, so that the rate counts
    finished work); returns whether it printed."""
    now = self.clock()
    if now - self.last < self.every_s:
      return False
    if wait_for is not None:
      jax.block_until_ready(wait_for)
      now = self.clock()
    self.last = now
    rate = (done - self.start_done) / max(now - self.start, 1e-9)
    left = (self.total - done) / rate if rate > 0 else float("inf")
    _say(f"{self.what}: {self.unit} {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%), "
         f"{rate:.3g} {self.unit}s/s, ETA {_duration(left)}")
    return True


def _duration(seconds: float) -> str:
  """H:MM:SS, or '?' when unknown (no progress yet)."""
  if not np.isfinite(seconds) or seconds > 1e7:
    return "?"
  minutes, secs = divmod(round(seconds), 60)
  return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _progress_every_s(config) -> float:
  return float(config.train.get("progress_every_s", PROGRESS_EVERY_S))


@dataclasses.dataclass
class Trainer:
  """The jitted steps of one run plus what they need from the data (no config globals)."""
  config: object
  mice: list
  mesh: jax.sharding.Mesh
  image_hwc: tuple

  def __post_init__(self):
    self.names = [m.name for m in self.mice]
    self.neuron_counts = [m.num_neurons for m in self.mice]
    limit = self.config.data.limit_data
    self.n_train = tuple(float(min(m.tier_size("train"), limit) if limit else m.tier_size("train"))
                         for m in self.mice)
    self.tx = make_optimizer(self.config.train)
    self._eval_data = {}
    self.repl = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(None, "data"))
    abstract = nnx.eval_shape(lambda: build_model(self.config, self.mice, self.image_hwc, 0))
    self.graphdef = split_model(abstract)[0]
    self.abstract_state = jax.eval_shape(
        lambda: new_state(build_model(self.config, self.mice, self.image_hwc, 0), self.tx))
    self.state_sharding = jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(self.mesh, state_spec(path, leaf, self.mesh)),
        self.abstract_state)
    self.train_step = jax.jit(
        functools.partial(train_step, graphdef=self.graphdef, tx=self.tx, n_train=self.n_train,
                          lrs=group_lrs(self.config.train),
                          microbatches=int(self.config.train.get("microbatches", 1))),
        in_shardings=(self.state_sharding, self.batch_sharding, self.repl, self.repl),
        out_shardings=(self.state_sharding, self.repl), donate_argnums=(0,))
    self.eval_step = jax.jit(
        functools.partial(eval_step, graphdef=self.graphdef, n_train=self.n_train),
        in_shardings=(self.state_sharding["params"], self.state_sharding["buffers"],
                      self.batch_sharding), out_shardings=self.repl)

  @property
  def run_info(self) -> dict:
    """What a checkpoint records to rebuild the model without the config file or the data."""
    return {"config": json.loads(self.config.to_json_best_effort()),
            "image_hwc": list(self.image_hwc),
            "mice": [{"name": m.name, "data_key": m.data_key, "neurons": m.num_neurons,
                      "n_train": n, "source": m.info["source_name"],
                      **dataset_meta.checkpoint_record(m)}
                     for m, n in zip(self.mice, self.n_train)]}

  def init_state(self, seed: int) -> dict:
    """The initial state, created directly with its sharding (nothing to donate by accident).

    With `train.pretrain_core`, the core's parameters come from that run's best checkpoint
    (the original's --pretrain_core); its lr and regulariser are 0, so it stays frozen.
    """
    def make():
      model = build_model(self.config, self.mice, self.image_hwc, seed)
      if core is not None:
        nnx.update(model.core, core)
      return new_state(model, self.tx)
    core = None
    if self.config.train.pretrain_core:
      core = pretrained_core(self.config.train.pretrain_core, self.graphdef,
                             self.abstract_state["params"])
    return jax.jit(make, out_shardings=self.state_sharding)()

  def device_batch(self, batch: dict) -> dict:
    """This process's rows -> global arrays sharded on the batch axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(batch[k]))
            for k in MODEL_INPUTS}

  def eval_data(self, tier: str):
    """(dataset, number of batches) of `tier`, built once per Trainer (tf.data datasets can be
    iterated again; building one traces its map functions, ~0.3 s each time)."""
    from v1t_jax import input_pipeline   # TensorFlow only where data is read
    if tier not in self._eval_data:
      self._eval_data[tier] = input_pipeline.eval_dataset(self.mice, tier, self.config.data)
    return self._eval_data[tier]

  def evaluate(self, state: dict, tier: str) -> dict:
    """Single-trial correlation (per neuron over the whole tier) and Poisson loss per mouse."""
    from v1t_jax import input_pipeline   # TensorFlow only where data is read
    ds, num_batches = self.eval_data(tier)
    progress = Progress(f"evaluating {tier}", num_batches, "batch",
                        every_s=_progress_every_s(self.config))
    outs = []
    for b in input_pipeline.as_numpy(ds):
      outs.append(self.eval_step(state["params"], state["buffers"], self.device_batch(b)))
      progress(len(outs), wait_for=outs[-1])
    corr_sums = sum(np.asarray(o["corr_sums"], np.float64) for o in outs)
    poisson = sum(np.asarray(o["poisson"], np.float64) for o in outs)
    per_mouse, mean = metrics.mean_correlation(corr_sums, self.neuron_counts)
    return {"single_trial_correlation": dict(zip(self.names, per_mouse.tolist())),
            "single_trial_correlation_average": mean,
            "poisson_loss": dict(zip(self.names, (poisson / max(len(outs), 1)).tolist()))}

  def tier_metrics(self, state: dict, tier: str, mice: list[int],
                   truth: dict[int, np.ndarray] | None = None) -> dict:
    """Single-trial correlation, correlation to average and FEVE of `tier` for the given mice
    (and of the noise-free truth, the oracle, where `truth` gives standardised rates per trial)."""
    from v1t_jax import input_pipeline
    ds, num_batches = self.eval_data(tier)
    model = {m: metrics.TierMetrics(self.neuron_counts[m]) for m in mice}
    oracle = {m: metrics.TierMetrics(self.neuron_counts[m]) for m in (truth or {})}
    progress = Progress(f"challenge metrics on {tier}", num_batches, "batch",
                        every_s=_progress_every_s(self.config))
    for i, b in enumerate(input_pipeline.as_numpy(ds)):
      progress(i)
      pred = np.asarray(self.eval_step(state["params"], state["buffers"],
                                       self.device_batch(b))["pred"])   # replicated output
      b = {k: _all_rows(b[k]) for k in ("responses", "image_id", "valid", "trial")}
      for m in mice:
        model[m].add(pred[m], b["responses"][m], b["image_id"][m], b["valid"][m])
      for m, rates in (truth or {}).items():
        valid = b["valid"][m]
        oracle[m].add(rates[np.where(valid, b["trial"][m], 0)], b["responses"][m],
                      b["image_id"][m], valid)
    out = {"model": _by_mouse({self.names[m]: a.result() for m, a in model.items()})}
    if oracle:
      out["oracle"] = _by_mouse({self.names[m]: a.result() for m, a in oracle.items()})
    return out


def abstract_model(model_cfg: ModelConfig, counts: Sequence[int], image_hwc) -> V1T:
  """A V1T of these mice with shapes only, to restore a checkpoint into (the coordinates and
  the bias statistics are placeholders: their values come from the checkpoint)."""
  n_max = max(counts)
  placeholder = np.ones((len(counts), n_max), np.float32)
  return nnx.eval_shape(lambda: V1T(
      model_cfg, neuron_counts=counts, coordinates=np.zeros((len(counts), n_max, 3), np.float32),
      image_shape=tuple(image_hwc), response_mean=placeholder, response_std=placeholder,
      rngs=nnx.Rngs(0)))


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


def make_optimizer_for_restore() -> optax.GradientTransformation:
  """The optimizer-state layout of every run (Adam at unit lr), for restoring its checkpoint."""
  return optax.adam(1.0)


def _all_rows(local_MxB):
  """The global batch rows of a host-local [M, B_local, ...] array (identity on one process)."""
  if jax.process_count() == 1:
    return local_MxB
  from jax.experimental import multihost_utils
  rows = multihost_utils.process_allgather(np.moveaxis(local_MxB, 1, 0), tiled=True)
  return np.moveaxis(np.asarray(rows), 0, 1)


def _json_safe(tree):
  """NaN -> None, so the files are strict JSON."""
  if isinstance(tree, dict):
    return {k: _json_safe(v) for k, v in tree.items()}
  if isinstance(tree, float) and not np.isfinite(tree):
    return None
  return tree


def _by_mouse(per_mouse: dict[str, dict]) -> dict:
  """{mouse: metrics} plus the unweighted mean over mice under "average"."""
  keys = next(iter(per_mouse.values())).keys()
  def mean(values):   # FEVE is NaN where a tier has no repeats; average what is defined
    finite = [x for x in values if np.isfinite(x)]
    return float(np.mean(finite)) if finite else float("nan")

  average = {k: mean([v[k] for v in per_mouse.values()]) for k in keys}
  return {**per_mouse, "average": average}


def synthetic_truth(trainer: Trainer) -> dict[int, np.ndarray]:
  """Standardised noise-free rates [trials, N] per mouse of a synthetic config (file order)."""
  if "synthetic" not in trainer.config:
    return {}
  out = {}
  for m, meta in enumerate(trainer.mice):
    path = os.path.join(trainer.config.synthetic.zip_dir,
                        meta.info["source_name"][: -len(".zip")] + ".truth.npz")
    if os.path.exists(path):
      rates = np.load(path)["rates"] * dataset_meta.normalisation(meta).response_precision
      out[m] = np.pad(rates, [(0, 0), (0, max(trainer.neuron_counts) - rates.shape[1])])
  return out


# ---------------------------------------------------------------------------------------------
# Checkpoints.


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


def restore(manager: ocp.CheckpointManager, trainer: Trainer, step: int | None = None):
  step = manager.latest_step() if step is None else step
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        trainer.abstract_state, trainer.state_sharding)
  r = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return r.state, r.meta


def _one_line(error: BaseException) -> str:
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
  saved, now = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
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


def restore_newest_intact(manager: ocp.CheckpointManager, trainer: Trainer,
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
      damaged.append((step, _one_line(e)))
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
      damaged.append((step, _one_line(e)))
      continue
    if not state_is_finite(state):
      damaged.append((step, "it holds NaN/inf values"))
      continue
    if changed:
      _say(f"resuming with settings other than the checkpoint's: {_changes(changed)}")
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
    _say(f"checkpoint {manager.directory / str(bad)} is damaged ({why}); moved it to {target} "
         f"and resuming from step {step}")
  if damaged:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("damaged checkpoints moved")
    manager.reload()
  return state, meta


# ---------------------------------------------------------------------------------------------
# Loops.


def make_mesh(neuron_shards: int = 1) -> jax.sharding.Mesh:
  """Every device of every process: `data` (the batch) x `neurons` (the readouts' neuron axis,
  size 1 unless `mesh.neuron_shards` asks for more, for very large neuron counts)."""
  n = jax.device_count()
  if neuron_shards < 1 or n % neuron_shards:
    raise ValueError(f"mesh.neuron_shards={neuron_shards} must divide the device count {n}")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((n // neuron_shards, neuron_shards), ("data", "neurons"),
                       axis_types=(auto, auto))


def setup(config):
  from v1t_jax import input_pipeline
  mice = dataset_meta.resolve_mice(config.data.data_dir, tuple(config.data.mice))
  reader = input_pipeline.readers(mice[:1], config.data)[0]
  neuron_shards = config.mesh.neuron_shards if "mesh" in config else 1
  return Trainer(config, mice, make_mesh(neuron_shards), reader.output_hwc)


def _scalars(prefix: str, result: dict) -> dict:
  out = {}
  for key, value in result.items():
    if isinstance(value, dict):
      out.update({f"{prefix}/{key}/{mouse}": v for mouse, v in value.items()})
      out[f"{prefix}/{key}/average"] = float(np.mean(list(value.values())))
    else:
      out[f"{prefix}/{key}"] = value
  return out


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


def train_and_evaluate(config, workdir: str,
                       on_epoch: Callable[[int, dict], bool] | None = None) -> dict:
  """Trains (resuming from workdir when it holds a checkpoint), then evaluates the best state.

  `on_epoch(epoch, val)`, if given, is called on process 0 after every epoch's validation and
  checkpoints (epoch counted from 1, `val` as `Trainer.evaluate`); True stops training there with
  stop_reason "pruned" (hyperparameter sweeps, v1t_jax/sweep.py). The workdir is locked while it
  runs (workdir_lock).
  """
  with workdir_lock(workdir):
    return _train_and_evaluate(config, workdir, on_epoch)


def _train_and_evaluate(config, workdir: str, on_epoch) -> dict:
  from clu import metric_writers, periodic_actions
  from v1t_jax import input_pipeline

  trainer = setup(config)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  latest, best = checkpoint_managers(workdir)
  steps_per_epoch = input_pipeline.steps_per_epoch(trainer.mice, config.data.batch_size,
                                                  config.data.limit_data)
  if config.train.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.train.max_steps_per_epoch)
  plateau = Plateau(config.train.lr_patience, config.train.lr_factor, config.train.max_reduce)
  start_epoch = 0
  epoch_sums = None   # a mid-epoch checkpoint's running sums of the epoch's step outputs
  resumed = restore_newest_intact(latest, trainer, workdir)
  if resumed is not None:
    state, meta = resumed
    plateau = Plateau.from_state(meta["plateau"])
    start_epoch = meta["epoch"]
    epoch_sums = meta.get("epoch_sums")
    _say(f"resumed from step {meta['step']} (epoch {start_epoch}) in {workdir}")
  else:
    state = trainer.init_state(config.seed)
    writer.write_hparams({k: v for k, v in _flat(config).items()
                          if isinstance(v, (int, float, str, bool))})
  key = jax.random.key(config.seed)
  step = int(state["step"])
  # Same batches and dropout keys as an uninterrupted run: the data order is a function of the
  # seed (skipped to `step`), the step key is fold_in(key, step).
  train_iter = iter(input_pipeline.as_numpy(input_pipeline.train_dataset(
      trainer.mice, config.data, start_step=step)))
  total_steps = config.train.num_epochs * steps_per_epoch
  decay_steps = min(config.train.lr_decay_epochs, config.train.num_epochs) * steps_per_epoch
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.train.log_every_steps)
  stop_reason = "max epochs"
  nonfinite = None   # why the state went bad: nothing of it is saved, the run fails
  with metric_writers.ensure_flushes(writer):
    for epoch in range(start_epoch, config.train.num_epochs):
      # float64 sums of the steps' outputs, saved with mid-epoch checkpoints: a resumed epoch
      # logs the mean over all its steps, as an uninterrupted run does.
      sums = EpochSums.from_meta(epoch_sums)
      epoch_sums = None
      epoch_end = (epoch + 1) * steps_per_epoch   # a run resumed mid-epoch finishes this epoch
      epoch_start = epoch * steps_per_epoch
      progress = Progress(f"epoch {epoch + 1}/{config.train.num_epochs}", steps_per_epoch,
                          done=step - epoch_start, every_s=_progress_every_s(config))
      while step < epoch_end:
        batch = trainer.device_batch(next(train_iter))
        lr_scale = plateau.lr_scale * decay_factor(step, total_steps, decay_steps)
        state, out = trainer.train_step(state, batch, jax.random.fold_in(key, step),
                                        jnp.float32(lr_scale))
        sums.add(out)
        step += 1
        report(step)
        progress(step - epoch_start, wait_for=out["loss"])
        every = config.train.checkpoint_every_steps
        if every and step % every == 0 and step < epoch_end:   # the epoch's end saves below
          if not state_is_finite(state):
            nonfinite = f"NaN/inf parameters or optimizer state at step {step} (epoch {epoch})"
            break
          save(latest, state, _meta(step, epoch, plateau, run=trainer.run_info,
                                    epoch_sums=sums.to_meta()))
      if nonfinite:
        break
      train = sums.means()
      if not np.isfinite(train["loss"]):
        nonfinite = f"NaN/inf training loss in epoch {epoch}"
        break
      if not state_is_finite(state):
        nonfinite = f"NaN/inf parameters or optimizer state at step {step} (epoch {epoch})"
        break
      with report.timed("eval"):
        val = trainer.evaluate(state, "validation")
      action = plateau.update(epoch, val["single_trial_correlation_average"])
      scalars = {"train/loss": float(train["loss"]),
                 "train/poisson": float(train["poisson"].mean()),
                 "train/reg": float(train["reg"].mean()),
                 "train/lr": config.train.lr * lr_scale, "epoch": epoch}   # the epoch's last
      scalars.update({f"train/poisson/{n}": float(v) for n, v in zip(trainer.names, train["poisson"])})
      scalars.update(_scalars("val", val))
      writer.write_scalars(step, scalars)
      every = config.train.figures_every_epochs
      if every and (epoch + 1) % every == 0 and (epoch + 1) < config.train.num_epochs:
        write_figures(writer, trainer, state, step, report)
      next_scale = plateau.lr_scale * decay_factor(step, total_steps, decay_steps)
      _say(f"epoch {epoch + 1}/{config.train.num_epochs} step {step}: train loss "
           f"{scalars['train/loss']:.1f}, val corr {val['single_trial_correlation_average']:.4f} "
           f"({action.value}, lr x{next_scale:.3g})")
      if not np.isfinite(val["single_trial_correlation_average"]):
        nonfinite = f"NaN validation correlation in epoch {epoch}"
        break
      if action is Action.IMPROVED:
        # Best before latest, and finished first: a run killed in between resumes from the
        # previous latest checkpoint and redoes this epoch (save() replaces the best step).
        save(best, state, _meta(step, epoch + 1, plateau, val=val, run=trainer.run_info))
        best.wait_until_finished()
      elif action is Action.REDUCE:
        # Reload the best weights, keep the optimizer moments (the original's scheduler); before
        # the latest save, so a run resumed from it continues from the reloaded weights.
        best.wait_until_finished()
        best_state, _ = restore(best, trainer)
        state = dict(state, params=best_state["params"])
      save(latest, state, _meta(step, epoch + 1, plateau, run=trainer.run_info))
      prune = on_epoch is not None and _hook_says_stop(on_epoch, epoch + 1, val)
      if action is Action.STOP:
        stop_reason = f"no improvement after {plateau.max_reduce} learning-rate reductions"
        break
      if prune:
        stop_reason = "pruned"
        break
    latest.wait_until_finished()
    best.wait_until_finished()
    if nonfinite:
      stop_reason = f"{nonfinite}; stopped without saving it, {_last_good(latest, workdir)}"
    _say(f"training stopped: {stop_reason}")
    if best.latest_step() is None:
      error = NonFiniteError if nonfinite else RuntimeError
      raise error(f"training stopped before any epoch finished well: {stop_reason}")
    result = evaluate_best(trainer, best, workdir, writer, step)
  result["stop_reason"] = stop_reason
  if nonfinite:   # the best state is evaluated, but the run failed (launch_train exits 1)
    result["error"] = stop_reason
  latest.close()
  best.close()
  return result


def _last_good(latest: ocp.CheckpointManager, workdir: str) -> str:
  """Names the newest checkpoint on disk (the one a rerun resumes from), or says there is none."""
  steps = latest.all_steps()
  if not steps:
    return f"no checkpoint in {run_path(workdir) / 'checkpoints'} yet"
  return f"the last good checkpoint is {run_path(workdir) / 'checkpoints' / str(max(steps))}"


def _hook_says_stop(on_epoch: Callable[[int, dict], bool], epoch: int, val: dict) -> bool:
  """on_epoch's answer on process 0, the same on every process."""
  stop = bool(on_epoch(epoch, val)) if jax.process_index() == 0 else False
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    stop = bool(multihost_utils.broadcast_one_to_all(np.bool_(stop)))
  return stop


def _say(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def _meta(step: int, epoch: int, plateau: Plateau, val: dict | None = None,
          run: dict | None = None, epoch_sums: dict | None = None) -> dict:
  meta = {"step": step, "epoch": epoch, "plateau": plateau.state(), "run": run or {}}
  if val is not None:
    meta["validation"] = val
  if epoch_sums is not None:
    meta["epoch_sums"] = epoch_sums
  return meta


class EpochSums:
  """Running float64 sums of the train steps' outputs ("loss", "poisson" [M], "reg" [M]) over
  one epoch, in step order; JSON round trip is exact (Python floats)."""

  def __init__(self, steps: int = 0, totals: dict | None = None):
    self.steps, self.totals = steps, totals or {}

  @classmethod
  def from_meta(cls, meta: dict | None) -> EpochSums:
    if not meta:
      return cls()
    return cls(meta["steps"], {k: np.asarray(v, np.float64) for k, v in meta["totals"].items()})

  def add(self, out: dict):
    for k, v in out.items():
      self.totals[k] = self.totals.get(k, 0.0) + np.asarray(v, np.float64)
    self.steps += 1

  def means(self) -> dict:
    return {k: v / self.steps for k, v in self.totals.items()}

  def to_meta(self) -> dict:
    return {"steps": self.steps, "totals": {k: np.asarray(v).tolist() for k, v in self.totals.items()}}


def _flat(config, prefix: str = "") -> dict:
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def evaluable_test_mice(trainer: Trainer) -> list[int]:
  """Mice whose test responses are not withheld (hashed trial ids mark competition mice)."""
  return [i for i, m in enumerate(trainer.mice)
          if m.tier_size("test") and not m.info.get("trial_idx_hashed")]


def metrics_table(challenge: dict) -> str:
  """The averaged challenge metrics of each tier as a readable table, next to the oracle ceiling
  (and the model / oracle ratio) where the synthetic ground truth exists."""
  names = ("single_trial_correlation", "correlation_to_average", "feve")
  oracle = challenge.get("oracle", {})
  lines = []
  for tier, per_mouse in challenge.items():
    if tier == "oracle" or "average" not in per_mouse:
      continue
    mice = len(per_mouse) - 1
    ceiling = oracle.get(tier, {}).get("average")
    header = f"{tier} ({mice} {'mouse' if mice == 1 else 'mice'}, averaged)"
    lines.append(f"{header:34s} {'model':>7s}" + (f" {'oracle':>7s} {'ratio':>6s}" if ceiling else ""))
    for name in names:
      value = per_mouse["average"].get(name)
      if value is None:
        continue
      row = f"  {name:32s} {value:7.3f}"
      if ceiling and ceiling.get(name) is not None:
        row += f" {ceiling[name]:7.3f}"
        if ceiling[name] > 0:   # a ratio to a ceiling <= 0 (or of two negatives) means nothing
          row += f" {value / ceiling[name]:5.2f}x"
      lines.append(row)
  return "\n".join(lines)


def evaluate_best(trainer: Trainer, best: ocp.CheckpointManager, workdir: str, writer=None,
                  step: int = 0, checkpoint_step: int | None = None) -> dict:
  """Evaluates the best (or a given) checkpoint on validation and test; writes evaluation.json."""
  if best.latest_step() is None:
    raise RunError(f"{workdir}: no checkpoint to evaluate (expected {workdir}/best)")
  step = best.latest_step() if checkpoint_step is None else checkpoint_step
  try:
    state, meta = restore(best, trainer, step)
  except Exception as e:   # orbax, tensorstore and json raise many types
    raise RunError(f"checkpoint {best.directory / str(step)} is damaged ({_one_line(e)})") from e
  result = {"checkpoint_step": int(meta["step"]), "epoch": int(meta["epoch"]),
            "validation": trainer.evaluate(state, "validation")}
  keep = evaluable_test_mice(trainer)
  # The challenge's metrics (sensorium_format.md §7) for every mouse with targets, plus the
  # oracle ceiling where the synthetic ground truth exists.
  truth = synthetic_truth(trainer)
  challenge, oracle = {}, {}
  for tier, mice in (("validation", list(range(len(trainer.mice)))), ("test", keep)):
    if mice:
      r = trainer.tier_metrics(state, tier, mice, {m: truth[m] for m in mice if m in truth})
      challenge[tier] = r["model"]
      if "oracle" in r:
        oracle[tier] = r["oracle"]
  if oracle:
    challenge["oracle"] = oracle
  challenge = _json_safe(challenge)   # undefined values (FEVE without repeats) become null
  result["metrics"] = challenge
  if "test" in challenge:   # the summary's test numbers, from the same pass
    per_mouse = {n: v["single_trial_correlation"] for n, v in challenge["test"].items()
                 if n != "average"}
    result["test"] = {"single_trial_correlation": per_mouse,
                      "single_trial_correlation_average": challenge["test"]["average"][
                          "single_trial_correlation"]}
  _say(metrics_table(challenge))
  if jax.process_index() == 0:
    (run_path(workdir) / "eval").mkdir(parents=True, exist_ok=True)
    (run_path(workdir) / "eval" / "metrics.json").write_text(json.dumps(challenge, indent=1))
    (run_path(workdir) / "evaluation.json").write_text(json.dumps(result, indent=1))
    if writer is not None:
      scalars = _scalars("final_val", result["validation"])
      if "test" in result:
        scalars.update(_scalars("test", result["test"]))
      for tier, per_mouse in challenge.items():
        if tier != "oracle":
          scalars.update({f"eval/{tier}/{k}/{mouse}": v for mouse, d in per_mouse.items()
                          for k, v in d.items() if v is not None})
      writer.write_scalars(step, scalars)
      if trainer.config.train.figures_every_epochs:
        write_figures(writer, trainer, state, step, prefix="best/")
  return result


def write_figures(writer, trainer: Trainer, state: dict, step: int, report=None,
                  prefix: str = "figures/"):
  """TensorBoard images of `state` (v1t_jax.figures); skipped on several processes, where the
  input pipeline gives each process only its slice of the validation tier."""
  if jax.process_count() > 1:
    return
  from v1t_jax import figures
  with report.timed("figures") if report is not None else contextlib.nullcontext():
    writer.write_images(step, figures.summary_images(trainer, state, step=step, prefix=prefix))


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


def evaluate_checkpoint(config, workdir: str) -> dict:
  """`--mode=evaluate`: the best checkpoint, or `config.eval.step` of the latest ones."""
  require_checkpoint(config, workdir)
  trainer = setup(config)
  latest, best = checkpoint_managers(workdir, create=False)
  manager, step = (best, None) if config.eval.step is None else (latest, config.eval.step)
  result = evaluate_best(trainer, manager, workdir, checkpoint_step=step)
  latest.close()
  best.close()
  return result
