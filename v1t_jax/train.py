"""Training: one jitted step over a device mesh, the epoch loop and the plateau rule.

State is a plain dict {params, buffers, opt_state, step} (v1t_jax.checkpoints) replicated over
the `data` mesh axis; batches `[M, B, ...]` are sharded on B. One optimizer update per stacked
batch reproduces the original's "accumulate one batch of every mouse, then step" (§8.2).
After every epoch the validation single-trial correlation drives the original's plateau rule
(§8.4), checkpoints go to `<workdir>/checkpoints` (latest, every epoch and every
`checkpoint_every_steps`) and `<workdir>/best` (best validation correlation); the best state is
then evaluated (v1t_jax.evaluation). Figures come from an optional hook (v1t_jax.figures).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from v1t_jax import checkpoints, dataset_meta, evaluation, losses, metrics
from v1t_jax.checkpoints import restore, run_meta, save, state_is_finite
from v1t_jax.model import build_model
from v1t_jax.plateau import Action, Plateau
from v1t_jax.progress import Progress, every_s, say

MODEL_INPUTS = ("image", "behavior", "pupil_center", "responses", "valid")


# ---------------------------------------------------------------------------------------------
# Optimizer.


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


# ---------------------------------------------------------------------------------------------
# Steps (module-level pure functions, jitted once with explicit shardings).


def compiler_options(mesh: jax.sharding.Mesh) -> dict | None:
  """XLA options for the train step and the init: on CPU, LLVM at -O1 instead of -O2 (compile
  ~25 % faster, steps within noise: docs/benchmarks.md, "Compile time on CPU"); else none.
  None as well under jax_disable_most_optimizations (the tests), which already sets -O0."""
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  if on_cpu and not jax.config.read("jax_disable_most_optimizations"):
    return {"xla_backend_optimization_level": 1}
  return None


def train_step(state, batch, key, lr_scale, lrs, *, graphdef, tx, n_train, microbatches=1):
  """One optimizer update on a [M, B, ...] batch; returns the new state and per-mouse losses.

  lrs: the group learning rates ({"lr", "core_lr"} scalars, `group_lrs`), an argument rather
  than constants so that runs differing only in lr (sweep trials) share one compiled program.

  Buffers the forward pass updates (a core's BatchNorm statistics) come back in the new state.
  microbatches k > 1: gradients of k slices of B/k trials per mouse, accumulated (activation
  memory / k, the same update up to the random draws and float rounding; BatchNorm statistics
  then see k batches of B/k, so the CNN configs keep k = 1).
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
    grads, poisson_M, reg_M, model = accumulated_grads(model, batch, key, n_train, microbatches)
    total = jnp.sum(poisson_M + reg_M)
  buffers = checkpoints.split_model(model)[2]   # as updated by the forward pass(es)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  updates = scale_updates(updates, lr_scale, **lrs)   # group lr x (plateau factor x decay)
  new = dict(state, params=optax.apply_updates(state["params"], updates), buffers=buffers,
             opt_state=opt_state, step=state["step"] + 1)
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
  """(grads, poisson [M], reg [M], model after the last slice) of the step's objective, its
  Poisson part summed over `microbatches` slices in a lax.scan (ds_scale from the whole step's
  trials), the regulariser's gradient taken once; buffer updates carried from slice to slice."""
  graphdef, state = nnx.split(model)   # carried through the scan, merged at its trace level

  def poisson(model, micro, key):
    _, aux = losses.objective(model, micro, n_train, train=True, key=key,
                              step_valid=batch["valid"], regularize=False)
    return jnp.sum(aux["poisson"]), aux["poisson"]

  def body(carry, xs):
    grads, poisson_M, state = carry
    micro, j = xs
    model = nnx.merge(graphdef, state)
    (_, micro_M), micro_grads = nnx.value_and_grad(poisson, has_aux=True)(
        model, micro, jax.random.fold_in(key, j))
    return (jax.tree.map(jnp.add, grads, micro_grads), poisson_M + micro_M,
            nnx.state(model)), None

  def regularizer(model):
    reg_M = losses.regularizer(model)
    return jnp.sum(reg_M), reg_M

  (_, reg_M), reg_grads = nnx.value_and_grad(regularizer, has_aux=True)(model)
  (grads, poisson_M, state), _ = jax.lax.scan(
      body, (reg_grads, jnp.zeros_like(reg_M), state),
      (microbatch_slices(batch, microbatches), jnp.arange(microbatches)))
  return grads, poisson_M, reg_M, nnx.merge(graphdef, state)


def eval_step(params, buffers, batch, *, graphdef, n_train):
  """Eval-mode losses and correlation sums of one batch (padding rows masked)."""
  model = nnx.merge(graphdef, params, buffers)
  _, aux = losses.objective(model, batch, n_train, train=False)
  return {"poisson": aux["poisson"], "pred": aux["pred"],
          "corr_sums": metrics.correlation_sums(aux["pred"], batch["responses"], batch["valid"])}


def ensemble_eval_step(params, buffers, batch, *, graphdef, n_train):
  """eval_step of an ensemble (a leading member axis on params and buffers): the members'
  predictions averaged ("pred", "corr_sums"; "poisson" the members' mean loss), and each
  member's own ("member_pred" [K, M, B, N], "member_corr_sums")."""
  members = jax.vmap(functools.partial(eval_step, graphdef=graphdef, n_train=n_train),
                     in_axes=(0, 0, None))(params, buffers, batch)
  pred = jnp.mean(members["pred"], axis=0)
  return {"poisson": jnp.mean(members["poisson"], axis=0), "pred": pred,
          "corr_sums": metrics.correlation_sums(pred, batch["responses"], batch["valid"]),
          "member_pred": members["pred"], "member_corr_sums": members["corr_sums"]}


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


def members_of(config) -> int:
  """train.ensemble_size: the number of members trained side by side (1 = one model)."""
  members = int(config.train.get("ensemble_size", 1))
  if members < 1:
    raise ValueError(f"train.ensemble_size must be >= 1, got {members}")
  return members


@dataclasses.dataclass
class Trainer:
  """The jitted steps of one run plus what they need from the data (no config globals).

  With `train.ensemble_size` K > 1 every state leaf has a leading member axis: K models that
  differ only in their seed (config.seed + k, for the parameters and the dropout keys) see the
  same batches, in one program (the step vmapped over members), each with its own lr factor.
  """
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
    self.graphdef, *abstract_vars = checkpoints.split_model(abstract)
    self.members = members_of(self.config)
    # The state's shapes from the abstract model (tracing build_model once, not twice).
    one = jax.eval_shape(
        lambda variables: checkpoints.new_state(nnx.merge(self.graphdef, *variables), self.tx),
        abstract_vars)
    self.abstract_state = checkpoints.stacked(one, self.members)
    # A member axis first (replicated), then each leaf's own spec.
    prefix = (None,) if self.members > 1 else ()
    self.state_sharding = jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(self.mesh, P(*prefix, *state_spec(path, leaf, self.mesh))),
        one)
    step = functools.partial(train_step, graphdef=self.graphdef, tx=self.tx, n_train=self.n_train,
                             microbatches=int(self.config.train.get("microbatches", 1)))
    self.lrs = {k: np.float32(v) for k, v in group_lrs(self.config.train).items()}
    evaluate = functools.partial(eval_step, graphdef=self.graphdef, n_train=self.n_train)
    if self.members > 1:   # keys [K] and lr factors [K]: one per member
      step = jax.vmap(step, in_axes=(0, None, 0, 0, None))
      evaluate = functools.partial(ensemble_eval_step, graphdef=self.graphdef,
                                   n_train=self.n_train)
    # jitted_train_step(state, batch, key, lr_scale, lrs); train_step binds this run's lrs.
    self.jitted_train_step = jax.jit(
        step,
        in_shardings=(self.state_sharding, self.batch_sharding, self.repl, self.repl, self.repl),
        out_shardings=(self.state_sharding, self.repl), donate_argnums=(0,),
        compiler_options=compiler_options(self.mesh))
    self.eval_step = jax.jit(
        evaluate, in_shardings=(self.state_sharding["params"], self.state_sharding["buffers"],
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
    """The initial state, created directly with its sharding (nothing to donate by accident);
    member k of an ensemble is the model of seed + k.

    With `train.pretrain_core`, the core's parameters come from that run's best checkpoint
    (the original's --pretrain_core); its lr and regulariser are 0, so it stays frozen.
    """
    def make(seed):   # an argument: runs of other seeds share the compiled program
      states = []
      for k in range(self.members):
        model = build_model(self.config, self.mice, self.image_hwc, seed + k)
        if core is not None:
          nnx.update(model.core, core)
        states.append(checkpoints.new_state(model, self.tx))
      if self.members == 1:
        return states[0]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    core = None
    if self.config.train.pretrain_core:
      one_params = jax.tree.map(lambda x: x[0], self.abstract_state["params"]) \
          if self.members > 1 else self.abstract_state["params"]
      core = checkpoints.pretrained_core(self.config.train.pretrain_core, self.graphdef,
                                         one_params)
    return jax.jit(make, out_shardings=self.state_sharding,
                   compiler_options=compiler_options(self.mesh))(np.int32(seed))

  def step_keys(self, seed: int, step: int) -> jax.Array:
    """The step's PRNG key (fold_in(key(seed), step)); [K] keys of seeds seed + k for K > 1."""
    if self.members == 1:
      return jax.random.fold_in(jax.random.key(seed), step)
    return jnp.stack([jax.random.fold_in(jax.random.key(seed + k), step)
                      for k in range(self.members)])

  def train_step(self, state: dict, batch: dict, key: jax.Array, lr_scale) -> tuple[dict, dict]:
    """One update at this run's learning rates times lr_scale (plateau x decay); donates state.
    lr_scale is made float32 here: a Python float (weakly typed) would compile another program."""
    return self.jitted_train_step(state, batch, key, np.asarray(lr_scale, np.float32), self.lrs)

  def device_batch(self, batch: dict) -> dict:
    """This process's rows -> global arrays sharded on the batch axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(batch[k]))
            for k in MODEL_INPUTS}

  def eval_data(self, tier: str):
    """(dataset, number of batches) of `tier`, built once per Trainer (tf.data datasets can be
    iterated again; building one traces its map functions, ~0.3 s each time)."""
    from v1t_jax import input_pipeline  # TensorFlow only where data is read
    if tier not in self._eval_data:
      self._eval_data[tier] = input_pipeline.eval_dataset(self.mice, tier, self.config.data)
    return self._eval_data[tier]

  def evaluate(self, state: dict, tier: str) -> dict:
    """Single-trial correlation (per neuron over the whole tier) and Poisson loss per mouse."""
    from v1t_jax import input_pipeline  # TensorFlow only where data is read
    ds, num_batches = self.eval_data(tier)
    progress = Progress(f"evaluating {tier}", num_batches, "batch",
                        every_s=every_s(self.config))
    outs = []
    for b in input_pipeline.as_numpy(ds):
      out = self.eval_step(state["params"], state["buffers"], self.device_batch(b))
      out.pop("member_pred", None)   # challenge metrics only (tier_metrics)
      outs.append(out)
      progress(len(outs), wait_for=outs[-1])
    corr_sums = sum(np.asarray(o["corr_sums"], np.float64) for o in outs)
    poisson = sum(np.asarray(o["poisson"], np.float64) for o in outs)
    per_mouse, mean = metrics.mean_correlation(corr_sums, self.neuron_counts)
    result = {"single_trial_correlation": dict(zip(self.names, per_mouse.tolist())),
              "single_trial_correlation_average": mean,
              "poisson_loss": dict(zip(self.names, (poisson / max(len(outs), 1)).tolist()))}
    if self.members > 1:   # each member's average, for its own plateau rule
      sums_K = sum(np.asarray(o["member_corr_sums"], np.float64) for o in outs)
      result["member_single_trial_correlation_average"] = [
          metrics.mean_correlation(sums, self.neuron_counts)[1] for sums in sums_K]
    return result



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


def train_and_evaluate(config, workdir: str,
                       on_epoch: Callable[[int, dict], bool] | None = None,
                       figures: Callable | None = None) -> dict:
  """Trains (resuming from workdir when it holds a checkpoint), then evaluates the best state.

  `on_epoch(epoch, val)`, if given, is called on process 0 after every epoch's validation and
  checkpoints (epoch counted from 1, `val` as `Trainer.evaluate`); True stops training there with
  stop_reason "pruned" (hyperparameter sweeps, v1t_jax/sweep.py). `figures(writer, trainer,
  state, step, prefix=..., report=...)` (e.g. v1t_jax.figures.write_summary) writes TensorBoard
  figures every `train.figures_every_epochs` and of the best state at the end. The workdir is
  locked while it runs (checkpoints.workdir_lock).
  """
  with checkpoints.workdir_lock(workdir):
    return _train_and_evaluate(config, workdir, on_epoch, figures)


def _train_and_evaluate(config, workdir: str, on_epoch, figures) -> dict:
  from clu import metric_writers, periodic_actions

  from v1t_jax import input_pipeline

  trainer = setup(config)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  latest, best = checkpoints.checkpoint_managers(workdir)
  steps_per_epoch = input_pipeline.steps_per_epoch(trainer.mice, config.data.batch_size,
                                                  config.data.limit_data)
  if config.train.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.train.max_steps_per_epoch)
  plateau = Members([Plateau(config.train.lr_patience, config.train.lr_factor,
                             config.train.max_reduce) for _ in range(trainer.members)])
  start_epoch = 0
  epoch_sums = None   # a mid-epoch checkpoint's running sums of the epoch's step outputs
  resumed = checkpoints.restore_newest_intact(latest, trainer, workdir)
  if resumed is not None:
    state, meta = resumed
    plateau = Members.from_state(meta["plateau"])
    start_epoch = meta["epoch"]
    epoch_sums = meta.get("epoch_sums")
    say(f"resumed from step {meta['step']} (epoch {start_epoch}) in {workdir}")
  else:
    state = trainer.init_state(config.seed)
    writer.write_hparams({k: v for k, v in checkpoints.flat(config).items()
                          if isinstance(v, (int, float, str, bool))})
  step = int(np.asarray(state["step"]).flat[0])
  # Same batches and dropout keys as an uninterrupted run: the data order is a function of the
  # seed (skipped to `step`), the step key is fold_in(key, step).
  train_iter = iter(input_pipeline.as_numpy(input_pipeline.train_dataset(
      trainer.mice, config.data, start_step=step, epoch_steps=steps_per_epoch)))
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
                          done=step - epoch_start, every_s=every_s(config))
      while step < epoch_end:
        batch = trainer.device_batch(next(train_iter))
        lr_scale = plateau.lr_scales() * decay_factor(step, total_steps, decay_steps)
        state, out = trainer.train_step(state, batch, trainer.step_keys(config.seed, step),
                                        lr_scale if trainer.members > 1 else lr_scale[0])
        sums.add(out)
        step += 1
        report(step)
        progress(step - epoch_start, wait_for=out["loss"])
        every = config.train.checkpoint_every_steps
        if every and step % every == 0 and step < epoch_end:   # the epoch's end saves below
          if not state_is_finite(state):
            nonfinite = f"NaN/inf parameters or optimizer state at step {step} (epoch {epoch})"
            break
          save(latest, state, run_meta(step, epoch, plateau, run=trainer.run_info,
                                    epoch_sums=sums.to_meta()))
      if nonfinite:
        break
      train = sums.means()
      if not np.all(np.isfinite(train["loss"])):
        nonfinite = f"NaN/inf training loss in epoch {epoch}"
        break
      if not state_is_finite(state):
        nonfinite = f"NaN/inf parameters or optimizer state at step {step} (epoch {epoch})"
        break
      with report.timed("eval"):
        val = trainer.evaluate(state, "validation")
      actions = plateau.update(epoch, val.get("member_single_trial_correlation_average",
                                              [val["single_trial_correlation_average"]]))
      poisson_M = np.asarray(train["poisson"]).reshape(-1, len(trainer.names)).mean(0)
      scalars = {"train/loss": float(np.mean(train["loss"])),   # members' mean (ensembles)
                 "train/poisson": float(poisson_M.mean()),
                 "train/reg": float(np.mean(train["reg"])),
                 "train/lr": config.train.lr * float(np.mean(lr_scale)),   # the epoch's last
                 "epoch": epoch}
      scalars.update({f"train/poisson/{n}": float(v) for n, v in zip(trainer.names, poisson_M)})
      scalars.update(evaluation.scalars("val", val))
      writer.write_scalars(step, scalars)
      every = config.train.figures_every_epochs
      if (figures and every and (epoch + 1) % every == 0
          and (epoch + 1) < config.train.num_epochs):
        figures(writer, trainer, state, step, report=report)
      next_scale = plateau.lr_scales() * decay_factor(step, total_steps, decay_steps)
      said = ", ".join(a.value for a in actions)
      scales = ", ".join(f"x{s:.3g}" for s in next_scale)
      say(f"epoch {epoch + 1}/{config.train.num_epochs} step {step}: train loss "
          f"{scalars['train/loss']:.1f}, val corr {val['single_trial_correlation_average']:.4f} "
          + (f"({said}, lr {scales})" if trainer.members == 1
             else f"(members: {said}; lr {scales})"))
      if not np.isfinite(val["single_trial_correlation_average"]):
        nonfinite = f"NaN validation correlation in epoch {epoch}"
        break
      improved = [a is Action.IMPROVED for a in actions]
      if any(improved):
        # Best before latest, and finished first: a run killed in between resumes from the
        # previous latest checkpoint and redoes this epoch (save() replaces the best step).
        # An ensemble's best holds each member's own best state.
        best.wait_until_finished()
        best_state = state
        if not all(improved):
          best_state = members_where(improved, state, restore(best, trainer)[0])
        save(best, best_state, run_meta(step, epoch + 1, plateau, val=val, run=trainer.run_info))
        best.wait_until_finished()
      reduced = [a is Action.REDUCE for a in actions]
      if any(reduced):
        # Reload the best weights, keep the optimizer moments (the original's scheduler); before
        # the latest save, so a run resumed from it continues from the reloaded weights.
        best.wait_until_finished()
        best_state, _ = restore(best, trainer)
        state = dict(state, params=members_where(reduced, best_state, state)["params"])
      save(latest, state, run_meta(step, epoch + 1, plateau, run=trainer.run_info))
      prune = on_epoch is not None and _hook_says_stop(on_epoch, epoch + 1, val)
      if plateau.all_stopped():
        stop_reason = (f"no improvement after {config.train.max_reduce} learning-rate reductions"
                       + (" (every member)" if trainer.members > 1 else ""))
        break
      if prune:
        stop_reason = "pruned"
        break
    latest.wait_until_finished()
    best.wait_until_finished()
    if nonfinite:
      stop_reason = (f"{nonfinite}; stopped without saving it, "
                     f"{checkpoints.last_good(latest, workdir)}")
    say(f"training stopped: {stop_reason}")
    if best.latest_step() is None:
      error = checkpoints.NonFiniteError if nonfinite else RuntimeError
      raise error(f"training stopped before any epoch finished well: {stop_reason}")
    result = evaluation.evaluate_best(trainer, best, workdir, writer, step, figures=figures)
  result["stop_reason"] = stop_reason
  if nonfinite:   # the best state is evaluated, but the run failed (launch_train exits 1)
    result["error"] = stop_reason
  latest.close()
  best.close()
  return result


class Members:
  """The plateau rule of every member (one Plateau each); a member that reached STOP is done:
  its lr factor is 0 and its best state stays as it is while the others train on."""

  def __init__(self, plateaus: list[Plateau], stopped: list[bool] | None = None):
    self.plateaus = plateaus
    self.stopped = list(stopped or [False] * len(plateaus))

  def lr_scales(self) -> np.ndarray:
    return np.array([0.0 if s else p.lr_scale for p, s in zip(self.plateaus, self.stopped)],
                    np.float32)

  def update(self, epoch: int, values) -> list[Action]:
    """Each running member's action for its validation value (a stopped one: STOP again)."""
    actions = []
    for k, (p, value) in enumerate(zip(self.plateaus, values, strict=True)):
      action = Action.STOP if self.stopped[k] else p.update(epoch, value)
      self.stopped[k] = action is Action.STOP
      actions.append(action)
    return actions

  def all_stopped(self) -> bool:
    return all(self.stopped)

  def state(self):
    """One model: the Plateau's dict (the layout of every checkpoint before ensembles)."""
    if len(self.plateaus) == 1 and not self.stopped[0]:
      return self.plateaus[0].state()
    return {"members": [p.state() for p in self.plateaus], "stopped": self.stopped}

  @classmethod
  def from_state(cls, state) -> Members:
    if "members" not in state:
      return cls([Plateau.from_state(state)])
    return cls([Plateau.from_state(s) for s in state["members"]], state["stopped"])


def members_where(mask: list[bool], a: dict, b: dict) -> dict:
  """Per member: a's state where mask, else b's (one model: a or b)."""
  if len(mask) == 1:
    return a if mask[0] else b
  keep_K = np.asarray(mask)
  return jax.tree.map(
      lambda x, y: jnp.where(keep_K.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


def _hook_says_stop(on_epoch: Callable[[int, dict], bool], epoch: int, val: dict) -> bool:
  """on_epoch's answer on process 0, the same on every process."""
  stop = bool(on_epoch(epoch, val)) if jax.process_index() == 0 else False
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    stop = bool(multihost_utils.broadcast_one_to_all(np.bool_(stop)))
  return stop


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


def evaluate_checkpoint(config, workdir: str) -> dict:
  """`--mode=evaluate`: the best checkpoint, or `config.eval.step` of the latest ones."""
  checkpoints.require_checkpoint(config, workdir)
  trainer = setup(config)
  latest, best = checkpoints.checkpoint_managers(workdir, create=False)
  manager, step = (best, None) if config.eval.step is None else (latest, config.eval.step)
  result = evaluation.evaluate_best(trainer, manager, workdir, checkpoint_step=step)
  latest.close()
  best.close()
  return result
