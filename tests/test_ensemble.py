"""Ensembles (train.ensemble_size): K members in one program equal K separate models, resume
exactly, and predict with the members' average."""

import copy
import os
import shutil

import jax
import numpy as np

from configs import synthetic, synthetic_cnn
from v1t_jax import checkpoints, input_pipeline, predict, train


def tiny_config(data_dir, **train_overrides):
  config = synthetic.get_config("tiny")
  config.data.data_dir = data_dir
  config.train.update(train_overrides)
  return config


def test_members_equal_separate_models_with_their_seeds(tiny_data_dir):
  """Member k after 3 steps = the one-model trainer of seed + k on the same batches (its own
  dropout keys: the tiny config's dropout is on), with member-specific lr factors."""
  config = tiny_config(tiny_data_dir, ensemble_size=2)
  assert config.model.t_dropout > 0 and config.model.p_dropout > 0
  ensemble = train.setup(config)
  single = train.Trainer(tiny_config(tiny_data_dir), ensemble.mice, ensemble.mesh,
                         ensemble.image_hwc)
  batches = list(zip(range(3), input_pipeline.as_numpy(
      input_pipeline.train_dataset(ensemble.mice, config.data))))
  lr_K = np.array([1.0, 0.3], np.float32)
  state = ensemble.init_state(config.seed)
  for step, batch in batches:
    state, out = ensemble.train_step(state, ensemble.device_batch(batch),
                                     ensemble.step_keys(config.seed, step), lr_K)
  assert out["loss"].shape == (2,)
  for k in range(2):
    alone = single.init_state(config.seed + k)
    for step, batch in batches:
      alone, _ = single.train_step(alone, single.device_batch(batch),
                                   single.step_keys(config.seed + k, step), lr_K[k])
    for a, b in zip(jax.tree.leaves(alone["params"]), jax.tree.leaves(state["params"])):
      np.testing.assert_allclose(b[k], a, rtol=2e-5, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(state["params"])[0][0],
                         jax.tree.leaves(state["params"])[0][1])


def test_ensemble_run_resumes_exactly_and_predicts_the_member_mean(tiny_data_dir, tmp_path):
  """A 2-member run of the CNN core (BatchNorm statistics per member, in the state): both
  members evaluated, a run "killed" mid-epoch resumes to the same state, and the Predictor
  gives the members' mean."""
  workdir = str(tmp_path / "run")
  config = synthetic_cnn.get_config("tiny")
  config.data.data_dir = tiny_data_dir
  config.train.update(ensemble_size=2, num_epochs=1, checkpoint_every_steps=1)
  result = train.train_and_evaluate(config, workdir)
  members = result["metrics"]["members"]["validation"]
  assert len(members) == 2 and len(result["validation"]["member_single_trial_correlation_average"]) == 2
  trainer = train.setup(config)
  latest, best = checkpoints.checkpoint_managers(workdir)
  uninterrupted, meta = checkpoints.restore(latest, trainer, 3)
  latest.close(), best.close()
  assert len(meta["plateau"]["members"]) == 2
  means = np.asarray(uninterrupted["buffers"]["core"]["layers"][0]["norm"]["mean"])
  assert means.shape == (2, 8) and not np.allclose(means[0], means[1])

  killed = str(tmp_path / "killed")   # "killed" after step 2, mid-epoch
  shutil.copytree(workdir, killed, ignore=shutil.ignore_patterns(".lock"))
  shutil.rmtree(os.path.join(killed, "checkpoints", "3"))
  train.train_and_evaluate(config, killed)
  latest, best = checkpoints.checkpoint_managers(killed)
  resumed, _ = checkpoints.restore(latest, trainer, 3)
  latest.close(), best.close()
  for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  # The Predictor of the ensemble: the mean of one-model Predictors of each member's best state.
  ensemble = predict.Predictor.from_workdir(workdir)
  images = np.random.default_rng(0).uniform(0, 255, (3, 1, 144, 256)).astype(np.float32)
  got = ensemble.predict("90001-1-1", images)
  run = copy.deepcopy(ensemble.run)
  run["config"]["train"]["ensemble_size"] = 1
  alone = [predict.Predictor(ensemble.config, run, *jax.tree.map(
      lambda x, k=k: x[k], (ensemble.params, ensemble.buffers)), device=ensemble.device,
      step=ensemble.step, path=ensemble.path).predict("90001-1-1", images) for k in range(2)]
  np.testing.assert_allclose(got, np.mean(alone, axis=0), rtol=1e-5, atol=1e-6)
  assert not np.allclose(alone[0], alone[1], atol=1e-3)
