"""Objective: Poisson loss, ds_scale, L1 terms, core term per mouse, padding invariance."""

import jax
import numpy as np
import pytest
from flax import nnx

from v1t_jax import losses, readout
from v1t_jax import model as v1t_model

TINY = dict(patch_size=4, patch_stride=4, emb_dim=8, num_heads=2, num_blocks=1, mlp_dim=16,
            shifter_reg_scale=0.3)




def tiny_model(counts, coordinates):
  return v1t_model.V1T(v1t_model.ModelConfig(**TINY), neuron_counts=counts,
                       coordinates=coordinates, image_shape=(12, 16, 1), rngs=nnx.Rngs(0))


@nnx.jit
def evaluate(model, batch, n_train):
  """Eval-mode objective, its aux terms and the gradient of J_0 (mouse 0's objective alone)."""
  total0 = lambda m: (lambda out: (out[1]["total"][0], out))(
      losses.objective(m, batch, n_train, train=False))
  (_, (total, aux)), grads = nnx.value_and_grad(total0, has_aux=True)(model)
  return total, aux, grads


def make_batch(mice, batch, n_max, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.normal(size=(mice, batch, 12, 16, 1)).astype(np.float32),
      "behavior": rng.normal(size=(mice, batch, 3)).astype(np.float32),
      "pupil_center": rng.normal(size=(mice, batch, 2)).astype(np.float32),
      "responses": rng.gamma(1.0, size=(mice, batch, n_max)).astype(np.float32),
      "valid": np.ones((mice, batch), bool),
  }


def test_poisson_loss_matches_formula():
  rng = np.random.default_rng(0)
  pred = rng.uniform(0.1, 3.0, size=(2, 4, 5)).astype(np.float32)
  target = rng.gamma(1.0, size=(2, 4, 5)).astype(np.float32)
  target[0, 0, 0] = 0.0
  mask = rng.uniform(size=(2, 4, 5)) > 0.3
  eps = 1.1920929e-07
  assert losses.POISSON_EPS == np.float32(eps)
  expected = np.where(mask, (pred + eps) - (target + eps) * np.log(pred + eps), 0.0).sum((1, 2))
  np.testing.assert_allclose(losses.poisson_loss(pred, target, mask), expected, rtol=1e-5)


def test_ds_scale_uses_real_trials_of_each_mouse():
  valid = np.array([[True] * 8, [True] * 5 + [False] * 3])
  np.testing.assert_allclose(losses.ds_scale([4000, 20], valid), [np.sqrt(500.0), 2.0])


@pytest.fixture(scope="module")
def two_mice():
  counts = (3, 5)  # the shapes of test_model.py: the session's compiled ops are reused
  coordinates = np.random.default_rng(1).normal(size=(2, 5, 3)) * 100
  coordinates[0, 3:] = np.nan  # padding rows of mouse 0: never read
  return tiny_model(counts, coordinates), coordinates


def l1(module):
  return sum(float(np.abs(x).sum()) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_objective_terms_and_core_l1_once_per_mouse(two_mice):
  model, _ = two_mice
  batch = make_batch(2, 3, 5)
  batch["valid"][1, 2] = False
  n_train = (300, 100)
  total, aux, _ = evaluate(model, batch, n_train)
  mask = batch["valid"][:, :, None] & model.neuron_mask[:, None, :]
  poisson = losses.poisson_loss(aux["pred"], batch["responses"], mask) * np.sqrt([300 / 3, 100 / 2])
  np.testing.assert_allclose(aux["poisson"], poisson, rtol=1e-5)
  # Readout L1 over real neurons' features, shifter L1 over each mouse's shifter (NumPy).
  features = np.abs(np.asarray(model.readouts.features[...])).sum(-1)
  readout_l1 = (features * model.neuron_mask).sum(-1)
  graphdef, state = nnx.split(model.shifters)
  shifter_l1 = [l1(nnx.merge(graphdef, jax.tree.map(lambda x: x[m], state))) for m in range(2)]
  config = model.config
  expected_reg = (config.core_reg_scale * l1(model.core) + config.readout_reg_scale * readout_l1
                  + config.shifter_reg_scale * np.asarray(shifter_l1))
  np.testing.assert_allclose(aux["reg"], expected_reg, rtol=1e-5)
  # One objective = sum over mice, the core L1 term entering once per mouse (K = 2 times).
  np.testing.assert_allclose(total, float(np.sum(poisson + expected_reg)), rtol=1e-5)
  assert min(shifter_l1) > 0 and config.shifter_reg_scale > 0


def test_invalid_trials_and_padded_neurons_do_not_count(two_mice):
  model, _ = two_mice
  batch = make_batch(2, 3, 5)
  batch["valid"][1, 1:] = False
  changed = {k: v.copy() for k, v in batch.items()}
  changed["responses"][1, 1:] = 50.0  # invalid trials
  changed["responses"][0, :, 3:] = 50.0  # padded neurons of mouse 0
  _, aux, _ = evaluate(model, batch, (10, 10))
  _, aux_changed, _ = evaluate(model, changed, (10, 10))
  np.testing.assert_array_equal(aux["poisson"], aux_changed["poisson"])


def unpadded_mouse0(big, coordinates):
  """Mouse 0 of `big` as a one-mouse model of its 3 real neurons, built abstractly (no init)."""
  count = big.neuron_counts[0]
  small = nnx.eval_shape(lambda: tiny_model((count,), coordinates[:1, :count]))
  graphdef, _ = nnx.split(small)
  big_flat = dict(nnx.to_flat_state(nnx.state(big)))
  leaves = []
  for path, var in nnx.to_flat_state(nnx.state(small)):
    value = big_flat[path].get_value()
    if path[0] != "core":  # per-mouse parts: mouse 0, and its real neurons where per neuron
      per_neuron = path[1] in readout.PER_NEURON_PARAMS + ("source_grid",)
      value = value[:1, :count] if per_neuron else value[:1]
    leaves.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def test_padding_a_mouse_leaves_its_loss_and_gradients_unchanged(two_mice):
  """Mouse 0 padded to 5 neurons next to a second mouse vs mouse 0 alone with its 3 neurons."""
  big, coordinates = two_mice
  small = unpadded_mouse0(big, coordinates)
  # The padded mouse's source grid was normalised over its real neurons only.
  np.testing.assert_allclose(small.readouts.source_grid[...],
                             readout.source_grids(coordinates[:1, :3], (3,), 2), rtol=1e-6)
  big_batch = make_batch(2, 3, 5)
  small_batch = {k: v[:1] for k, v in big_batch.items()}
  small_batch["responses"] = small_batch["responses"][..., :3]
  _, big_aux, grad_big = evaluate(big, big_batch, (100, 100))
  _, small_aux, grad_small = evaluate(small, small_batch, (100,))
  for key in ("poisson", "reg", "total"):
    np.testing.assert_allclose(big_aux[key][0], small_aux[key][0], rtol=1e-5)
  flat_big = dict(nnx.to_flat_state(grad_big["readouts"]))
  for path, var in nnx.to_flat_state(grad_small["readouts"]):
    got = flat_big[path].get_value()
    if path[0] in readout.PER_NEURON_PARAMS:
      np.testing.assert_allclose(got[0, :3], var.get_value()[0], rtol=1e-4, atol=1e-7)
      np.testing.assert_array_equal(got[0, 3:], 0.0)  # padded neurons get no gradient
    else:
      np.testing.assert_allclose(got[0], var.get_value()[0], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(got[1], 0.0)  # the other mouse is untouched by J_0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grad_big["core"], grad_small["core"])


def test_train_mode_gives_padded_neurons_zero_gradient(two_mice):
  """Also the trainer's functional path: jax.grad over the Params split from the buffers."""
  model, _ = two_mice
  batch = make_batch(2, 3, 5)
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)

  def loss(params):
    merged = nnx.merge(graphdef, params, buffers)
    return losses.objective(merged, batch, (100, 100), key=jax.random.key(0))[0]

  grads = jax.jit(jax.grad(loss))(params)
  for name in ("features", "sigma", "bias"):
    np.testing.assert_array_equal(grads["readouts"][name].get_value()[0, 3:], 0.0)
    assert np.abs(grads["readouts"][name].get_value()[0, :3]).sum() > 0
