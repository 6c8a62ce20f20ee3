"""Training end to end on the tiny synthetic mice: checkpoints, resume, evaluate, plateau, devices."""

import json
import os

import jax
import numpy as np
import pytest

from configs import synthetic
from v1t_jax import checkpoints, evaluation, figures, input_pipeline, train
from v1t_jax.model import build_model


def tiny_config(data_dir, **train_overrides):
  config = synthetic.get_config("tiny")
  config.data.data_dir = data_dir
  for k, v in train_overrides.items():
    setattr(config.train, k, v)
  return config


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_train_interrupt_resume_and_evaluate(one_epoch_run, one_epoch_copy):
  """conftest's 1-epoch run (a checkpoint every step, the lr decaying over the epoch): its files;
  a copy "killed" after step 2 (mid-epoch, mid-decay) and restarted ends with the same
  parameters and logs the same epoch means; --mode=evaluate reproduces the best checkpoint."""
  import shutil
  workdir, config, said, result = one_epoch_run
  assert "epoch 1/1 step 3:" in said and "lr x0)" in said   # the decay ends at 0
  assert result["stop_reason"] == "max epochs"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]   # max_to_keep 2
  assert os.listdir(os.path.join(workdir, "best"))
  with open(os.path.join(workdir, "evaluation.json")) as f:
    saved = json.load(f)
  names = ["90001-1-1", "90002-2-3", "90003-4-5"]
  assert sorted(saved["validation"]["single_trial_correlation"]) == names
  # Test metrics only for the mouse whose test responses are not withheld.
  assert list(saved["test"]["single_trial_correlation"]) == ["90003-4-5"]
  assert all(np.isfinite(v) for v in saved["validation"]["single_trial_correlation"].values())
  trainer = train.setup(config)
  latest, best = checkpoints.checkpoint_managers(workdir)
  uninterrupted = leaves(checkpoints.restore(latest, trainer, 3)[0])
  latest.close(), best.close()
  logged = {tag: figures.read_scalars(workdir)[tag] for tag in ("train/loss", "train/poisson")}

  # "Kill" a copy after step 2, in the middle of the epoch, and run the same command again.
  killed = one_epoch_copy
  shutil.rmtree(os.path.join(killed, "checkpoints", "3"))
  train.train_and_evaluate(config, killed)
  latest, best = checkpoints.checkpoint_managers(killed)
  resumed, meta = checkpoints.restore(latest, trainer, 3)
  latest.close(), best.close()
  assert meta["epoch"] == 1
  for a, b in zip(uninterrupted, leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The resumed epoch logs the mean over its 3 steps (2 of them before the "kill"), not over the
  # one step it ran itself.
  for tag, (steps, values) in logged.items():
    again = figures.read_scalars(killed)[tag]
    np.testing.assert_array_equal(again[0], steps)
    np.testing.assert_allclose(again[1], values, rtol=1e-6)

  # The checkpoint carries what is needed to rebuild the model without config file or data.
  assert meta["run"]["config"]["model"]["emb_dim"] == 16
  assert [m["neurons"] for m in meta["run"]["mice"]] == [24, 31, 17]
  assert meta["run"]["image_hwc"] == [36, 64, 1]

  # --mode=evaluate restores the best checkpoint and reproduces its numbers.
  again = train.evaluate_checkpoint(config, killed)
  assert again["checkpoint_step"] == result["checkpoint_step"]
  np.testing.assert_allclose(again["validation"]["single_trial_correlation_average"],
                             saved["validation"]["single_trial_correlation_average"], rtol=1e-6)
  table = evaluation.metrics_table(again["metrics"]).splitlines()
  assert table[0].split() == ["validation", "(3", "mice,", "averaged)", "model", "oracle", "ratio"]
  assert table.index("test (1 mouse, averaged)             model  oracle  ratio") == 3
  assert float(table[4].split()[1]) == pytest.approx(
      again["metrics"]["test"]["average"]["single_trial_correlation"], abs=5e-4)


def test_metrics_table_puts_the_oracle_and_the_ratio_next_to_the_model():
  metrics = {"test": {"a": {}, "b": {}, "average": {"single_trial_correlation": 0.321,
                                                    "correlation_to_average": 0.555, "feve": None}},
             "oracle": {"test": {"average": {"single_trial_correlation": 0.5,
                                             "correlation_to_average": 0.8, "feve": None}}}}
  assert evaluation.metrics_table(metrics).splitlines() == [
      "test (2 mice, averaged)              model  oracle  ratio",
      "  single_trial_correlation           0.321   0.500  0.64x",
      "  correlation_to_average             0.555   0.800  0.69x"]
  # No ratio to a ceiling <= 0: -1.5 / -0.04 is not "36.70x".
  metrics["test"]["average"]["feve"] = -1.5
  metrics["oracle"]["test"]["average"]["feve"] = -0.04
  assert evaluation.metrics_table(metrics).splitlines()[-1] == (
      "  feve                              -1.500  -0.040")


def test_plateau_reduces_then_stops_and_reloads_best(tiny_data_dir, tmp_path):
  # lr 0: the weights never change, so the validation correlation never improves after epoch 1;
  # with patience 0 the rule reduces twice and then stops, exactly as the original's scheduler.
  config = tiny_config(tiny_data_dir, num_epochs=10, lr=0.0, lr_patience=0)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["stop_reason"] == "no improvement after 2 learning-rate reductions"
  assert result["epoch"] == 1 and result["checkpoint_step"] == 3


def test_nan_loss_stops_with_a_clear_message(tiny_data_dir, tmp_path):
  config = tiny_config(tiny_data_dir, num_epochs=3, lr=1e38)
  workdir = str(tmp_path / "run")
  with pytest.raises(RuntimeError, match="NaN/inf training loss in epoch 0"):
    train.train_and_evaluate(config, workdir)   # epoch 1 diverges: nothing good was saved
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "3"))


def test_microbatched_gradients_equal_whole_batch_gradients(tiny_data_dir):
  """Gradient accumulation over 2 slices = one whole-batch gradient (a deterministic objective:
  no dropout, readout sigma 0), ds_scale counted over the whole batch's real trials."""
  from flax import nnx

  from v1t_jax import losses
  config = tiny_config(tiny_data_dir)
  config.model.update(p_dropout=0.0, t_dropout=0.0, init_sigma=0.0)
  mice = train.dataset_meta.resolve_mice(config.data.data_dir)
  batch = next(iter(input_pipeline.as_numpy(input_pipeline.train_dataset(mice, config.data))))
  batch["valid"][1, -1] = False   # a padded trial: ds_scale must count the step's real trials
  batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  model = build_model(config, mice, (36, 64, 1), 0)
  n_train = (100.0, 200.0, 300.0)
  (total, aux), expected = jax.jit(nnx.value_and_grad(
      lambda m: losses.objective(m, batch, n_train, train=True, key=jax.random.key(0)),
      has_aux=True))(model)
  grads, poisson, reg, _ = jax.jit(train.accumulated_grads, static_argnums=(3, 4))(
      model, batch, jax.random.key(0), n_train, 2)
  np.testing.assert_allclose(poisson, aux["poisson"], rtol=1e-5)
  np.testing.assert_allclose(reg, aux["reg"], rtol=1e-6)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  for (path, a), b in zip(flat, leaves(expected)):
    if "sigma" not in jax.tree_util.keystr(path):   # d/dsigma = z dL/dposition: z is random
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
  with pytest.raises(ValueError, match="microbatches=3 must divide the batch size 4"):
    train.accumulated_grads(model, batch, jax.random.key(0), n_train, 3)


def test_group_learning_rates():
  config = synthetic.get_config("tiny").train
  assert train.group_lrs(config) == {"lr": config.lr, "core_lr": config.lr}
  config.core_lr = 1e-4
  assert train.group_lrs(config)["core_lr"] == 1e-4
  config.pretrain_core = "runs/pretrained"
  assert train.group_lrs(config)["core_lr"] == 0.0   # a pretrained core stays frozen
  updates = {"core": {"w": np.ones(2)}, "readouts": {"w": np.ones(3)}}
  scaled = train.scale_updates(updates, 0.3, lr=2.0, core_lr=0.5)
  np.testing.assert_allclose(scaled["core"]["w"], 0.15)
  np.testing.assert_allclose(scaled["readouts"]["w"], 0.6)


def test_runs_differing_only_in_lr_share_one_compiled_step(tiny_data_dir):
  """The group lrs are arguments of the jitted step, not constants: the trials of an lr sweep
  lower to the same program (one compile, then persistent-cache hits)."""
  programs, lrs = [], []
  for lr, core_lr in ((0.01, None), (0.02, 0.005)):
    trainer = train.setup(tiny_config(tiny_data_dir, lr=lr, core_lr=core_lr))
    batch = next(iter(input_pipeline.as_numpy(input_pipeline.train_dataset(
        trainer.mice, trainer.config.data))))
    lowered = trainer.jitted_train_step.lower(trainer.abstract_state, trainer.device_batch(batch),
                                              jax.random.key(0), 1.0, trainer.lrs)
    programs.append(lowered.as_text())
    lrs.append(trainer.lrs)
  assert programs[0] == programs[1]
  assert lrs == [pytest.approx({"lr": 0.01, "core_lr": 0.01}),
                 pytest.approx({"lr": 0.02, "core_lr": 0.005})]


def test_decay_factor_falls_linearly_over_the_last_steps():
  # 10 steps, the last 4 decayed: steps 6-9 train at 4/4, 3/4, 2/4, 1/4 of the lr.
  assert [train.decay_factor(s, 10, 4) for s in range(10)] == [1.0] * 7 + [0.75, 0.5, 0.25]
  assert [train.decay_factor(s, 10, 0) for s in (0, 9, 12)] == [1.0, 1.0, 1.0]   # off
  assert train.decay_factor(12, 10, 4) == 0.0   # past the end (a resume with fewer epochs)


def test_challenge_metrics_and_oracle(one_epoch_run):
  workdir = one_epoch_run[0]
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    m = json.load(f, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
  assert m["validation"]["average"]["feve"] is None     # no repeats in validation: undefined
  assert set(m) == {"validation", "test", "oracle"}
  assert set(m["test"]) == {"90003-4-5", "average"}          # withheld mice are not scored
  keys = {"single_trial_correlation", "correlation_to_average", "feve"}
  assert set(m["test"]["90003-4-5"]) == keys and set(m["validation"]["average"]) == keys
  oracle = m["oracle"]["test"]["90003-4-5"]
  assert 0.2 < oracle["single_trial_correlation"] < 0.8      # the truth vs noisy recordings
  assert oracle["correlation_to_average"] > oracle["single_trial_correlation"]
  assert m["test"]["90003-4-5"]["single_trial_correlation"] < oracle["single_trial_correlation"]


def test_one_train_step_golden_values(tiny_data_dir):
  """One step of the tiny config from seed 1234 on the first batch of the tiny mice.

  Golden values recorded on CPU (jax 0.10.2, 1 device) with this same code; they pin the
  initialisation, the data order and normalisation, the dropout / readout keys and the objective
  (per-mouse Poisson loss after ds_scale; R_m with the core L1 term in every mouse). The
  values were recorded with the "stream" order; "passes" is pinned by tests/test_train_order.py.
  The step runs on the 4 test devices, as training does (1 device: the same values).
  Poisson values re-recorded in session 13: one key split per pass changed the dropout masks.
  Recorded with two blocks (the tiny preset's count then), which are pinned here.
  """
  config = tiny_config(tiny_data_dir)
  config.model.num_blocks = 2
  config.data.train_order = "stream"
  trainer = train.setup(config)
  state = trainer.init_state(config.seed)
  batch = next(iter(input_pipeline.as_numpy(input_pipeline.train_dataset(trainer.mice,
                                                                          config.data))))
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  state, out = trainer.train_step(state, trainer.device_batch(batch), key, 1.0)
  np.testing.assert_allclose(float(out["loss"]), 2519.5317382812, rtol=1e-4)
  np.testing.assert_allclose(out["poisson"], [276.21304, 392.28934, 219.98274], rtol=1e-4)
  np.testing.assert_allclose(out["reg"], [543.68219, 543.73541, 543.62903], rtol=1e-4)
  assert int(state["step"]) == 1


def test_pretrained_core_is_loaded_and_frozen(tiny_data_dir, tmp_path, one_epoch_run):
  first = one_epoch_run[0]
  config = tiny_config(tiny_data_dir, num_epochs=1, pretrain_core=first)
  config.data.mice = ("90002-2-3", "90003-4-5")    # other mice: only the core is shared
  second = str(tmp_path / "second")
  train.train_and_evaluate(config, second)
  trainer = train.setup(tiny_config(tiny_data_dir))
  latest, best = checkpoints.checkpoint_managers(first)
  pretrained, _ = checkpoints.restore(best, trainer)
  latest.close(), best.close()
  trainer2 = train.setup(config)
  latest, best = checkpoints.checkpoint_managers(second)
  final, _ = checkpoints.restore(latest, trainer2)
  initial = trainer2.init_state(config.seed)
  latest.close(), best.close()
  for a, b in zip(leaves(pretrained["params"]["core"]), leaves(final["params"]["core"])):
    np.testing.assert_array_equal(a, b)                # loaded, then never updated
  moved = [not np.array_equal(a, b) for a, b in zip(leaves(initial["params"]["readouts"]),
                                                    leaves(final["params"]["readouts"]))]
  assert any(moved)                                     # the readouts did train
  bad = tiny_config(tiny_data_dir, pretrain_core=first)
  bad.model.emb_dim = 8
  with pytest.raises(ValueError, match="other shapes"):
    train.setup(bad).init_state(0)


def test_multi_device_steps_equal_single_device(tiny_data_dir):
  """Two steps on 4 devices with mesh.neuron_shards=2 (2 data x 2 neurons: the batch and the
  readouts' neuron axis split) give the single-device result (data parallelism across
  processes: test_multiprocess.py)."""
  assert jax.device_count() == 4
  config = tiny_config(tiny_data_dir)
  config.data.mice = ("90001-1-1", "90003-4-5")      # N_max 24: divisible by 2
  config.mesh.neuron_shards = 2
  mice = train.dataset_meta.resolve_mice(config.data.data_dir, config.data.mice)
  batch = next(iter(input_pipeline.as_numpy(input_pipeline.train_dataset(mice, config.data))))
  results = []
  auto = (jax.sharding.AxisType.Auto,) * 2
  for mesh in (jax.make_mesh((1, 1), ("data", "neurons"), axis_types=auto,
                             devices=jax.devices()[:1]), train.make_mesh(2)):
    trainer = train.Trainer(config, mice, mesh, (36, 64, 1))
    state = trainer.init_state(config.seed)
    for step in range(2):
      key = jax.random.fold_in(jax.random.key(config.seed), step)
      state, out = trainer.train_step(state, trainer.device_batch(batch), key, 1.0)
    results.append((float(out["loss"]), leaves(state)))
    assert all(len(x.sharding.device_set) == mesh.devices.size for x in jax.tree.leaves(state))
    if dict(zip(mesh.axis_names, mesh.devices.shape)).get("neurons", 1) == 2:
      spec = state["params"]["readouts"]["features"].sharding.spec
      assert tuple(spec)[:2] == (None, "neurons")
  for loss, params in results[1:]:
    np.testing.assert_allclose(loss, results[0][0], rtol=1e-5)
    for a, b in zip(params, results[0][1]):   # summation order differs: < 1% of an Adam step
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  config.data.mice = ()                                # N_max 31 cannot be split in 2
  with pytest.raises(ValueError, match="must divide the largest mouse's neuron count"):
    train.setup(config)


def test_state_is_finite_on_an_independent_reference():
  # The jitted check that guards every save (its run: test_run_guards.py, a NaN stop).
  tree = {"a": np.ones(3, np.float32), "n": np.int32(7), "b": np.array([1.0, np.inf])}
  assert not checkpoints.state_is_finite({"params": tree, "opt_state": ()})
  tree["b"][1] = 0.0
  assert checkpoints.state_is_finite({"params": tree, "opt_state": ()})
  tree["a"][0] = np.nan
  assert not checkpoints.state_is_finite({"params": (), "opt_state": tree})


def test_batchnorm_statistics_update_in_training_and_serve_evaluation(tiny_data_dir):
  """The train step returns the statistics its forward pass computed (the same as the core's own
  training call, whose BatchNorm equals PyTorch's: test_stacked2d.py), and evaluation uses them."""
  from configs import synthetic_cnn
  from flax import nnx

  from v1t_jax.model import tile_behavior
  config = synthetic_cnn.get_config("tiny")
  config.data.data_dir = tiny_data_dir
  trainer = train.setup(config)
  state = trainer.init_state(0)
  batch = trainer.device_batch(next(iter(input_pipeline.as_numpy(
      input_pipeline.train_dataset(trainer.mice, config.data)))))
  # Host copies: merge shares Variables with the state (an eager call would update them), and
  # the train step donates the state.
  params, buffers = jax.tree.map(np.array, (state["params"], state["buffers"]))
  model = nnx.merge(trainer.graphdef, *jax.tree.map(np.array, (params, buffers)))
  assert np.all(model.core.layers[0].norm.mean[...] == 0.0)
  # The core's own training call on the step's input (behaviour tiled as image channels).
  model.core(tile_behavior(batch["image"], batch["behavior"]), None, train=True,
             key=jax.random.key(0))
  expected = [(np.asarray(layer.norm.mean[...]), np.asarray(layer.norm.var[...]))
              for layer in model.core.layers]
  new, _ = trainer.train_step(state, batch, jax.random.key(0), jax.numpy.float32(1.0))
  stepped = nnx.merge(trainer.graphdef, new["params"], new["buffers"])
  for layer, (mean, var) in zip(stepped.core.layers, expected, strict=True):
    np.testing.assert_allclose(layer.norm.mean[...], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.norm.var[...], var, rtol=1e-5, atol=1e-6)
  assert not np.allclose(expected[0][0], 0.0)
  # Evaluation normalises with the running statistics: it equals an eval-mode forward of the
  # stepped model, and that differs from the same parameters with the initial statistics.
  out = trainer.eval_step(new["params"], new["buffers"], batch)
  inputs = (batch["image"], batch["behavior"], batch["pupil_center"])
  pred, _ = stepped(*inputs, train=False)
  np.testing.assert_allclose(out["pred"], pred, rtol=1e-5, atol=1e-6)
  initial = nnx.merge(trainer.graphdef, new["params"], buffers)
  assert not np.allclose(initial(*inputs, train=False)[0], pred, atol=1e-3)
