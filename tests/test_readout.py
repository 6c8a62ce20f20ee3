"""Gaussian2d readouts: bilinear sampler, positions, source grid, stacking over mice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v1t_jax import layers, readout


def numpy_grid_sample(feat_bhwc, grid_bn2):
  """Reference F.grid_sample(bilinear, zeros, align_corners=True), one point at a time."""
  batch, height, width, channels = feat_bhwc.shape
  out = np.zeros(grid_bn2.shape[:2] + (channels,), np.float64)
  for b in range(batch):
    for n, (gx, gy) in enumerate(grid_bn2[b].astype(np.float64)):
      ix, iy = (gx + 1) / 2 * (width - 1), (gy + 1) / 2 * (height - 1)
      x0, y0 = int(np.floor(ix)), int(np.floor(iy))
      for x, y in [(x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)]:
        if 0 <= x < width and 0 <= y < height:
          out[b, n] += (1 - abs(ix - x)) * (1 - abs(iy - y)) * feat_bhwc[b, y, x]
  return out


def test_grid_sample_example_of_the_spec():
  feat = jnp.arange(6.0).reshape(1, 2, 3, 1)  # 2x3 map holding 0..5 row-major
  grid = jnp.array([[[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0], [3.0, 0.0]]])
  np.testing.assert_allclose(readout.bilinear_sample(feat, grid)[0, :, 0], [2.0, 2.5, 3.0, 0.0])


def test_grid_sample_matches_numpy_reference_inside_on_and_outside_the_border():
  rng = np.random.default_rng(0)
  feat = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  inside = rng.uniform(-1, 1, size=(2, 40, 2))
  border = rng.choice([-1.0, 1.0], size=(2, 20, 2))
  border[:, :10, 0] = rng.uniform(-1, 1, size=(2, 10))  # on the top/bottom edges
  outside = rng.uniform(-1.6, 1.6, size=(2, 40, 2))  # partly outside: zero padding
  far = np.full((2, 2, 2), 5.0)
  grid = np.concatenate([inside, border, outside, far], axis=1).astype(np.float32)
  got = readout.bilinear_sample(jnp.asarray(feat), jnp.asarray(grid))
  np.testing.assert_allclose(got, numpy_grid_sample(feat, grid), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[:, -2:], 0.0)


def test_source_grids_use_real_neurons_only():
  rng = np.random.default_rng(1)
  coordinates = rng.normal(100.0, 30.0, size=(2, 6, 3)).astype(np.float32)
  coordinates[0, 4:] = [[1e6, -1e6, 3.0], [np.nan, np.nan, np.nan]]  # padding of mouse 0
  grids = readout.source_grids(coordinates, (4, 6), dim=2)
  real = coordinates[0, :4, :2].astype(np.float64)
  centred = real - real.mean(0)
  np.testing.assert_allclose(grids[0, :4], centred / np.abs(centred).max(), rtol=1e-6)
  np.testing.assert_array_equal(grids[0, 4:], 0.0)
  assert np.abs(grids[1]).max() == 1.0  # one scalar scale for both columns
  assert readout.source_grids(coordinates, (4, 6), dim=3).shape == (2, 6, 3)


def test_initial_bias_modes():
  mean = np.array([[2.0, 4.0, 9.0], [1.0, 3.0, 5.0]], np.float32)  # mouse 0: 2 real neurons
  std = np.array([[2.0, 8.0, 0.0], [1.0, 2.0, 4.0]], np.float32)
  np.testing.assert_array_equal(readout.initial_bias(0, (2, 3), None, None), np.zeros((2, 3)))
  np.testing.assert_array_equal(readout.initial_bias(1, (2, 3), mean, std), [[2, 4, 0], [1, 3, 5]])
  np.testing.assert_array_equal(
      readout.initial_bias(2, (2, 3), mean, std), [[1, 0.5, 0], [1, 1.5, 1.25]])
  with pytest.raises(ValueError, match="response_mean"):
    readout.initial_bias(1, (2, 3), None, None)
  with pytest.raises(ValueError, match="shape"):
    readout.initial_bias(1, (2, 3), mean[:, :2], std)


def make_readouts(counts=(3, 5), channels=8, free_mu=False):
  coordinates = np.random.default_rng(2).normal(size=(len(counts), max(counts), 3))
  return readout.make_readouts(
      neuron_counts=counts, coordinates=coordinates,
      bias_MxN=np.zeros((len(counts), max(counts)), np.float32), num_channels=channels,
      disable_grid_predictor=free_mu, grid_predictor_dim=2, init_sigma=0.1, init_mu_range=0.3,
      rngs=nnx.Rngs(0))


def test_readout_init_and_parameter_count():
  readouts = make_readouts(counts=(3, 5))
  np.testing.assert_array_equal(readouts.features[...], 0.125)  # 1 / C
  sigma = np.asarray(readouts.sigma[...])
  assert sigma.shape == (2, 5, 2, 2) and np.abs(sigma).max() <= 0.1
  kernels = readouts.grid_predictor.fc1.kernel[...]
  assert kernels.shape == (2, 2, 30) and not np.allclose(kernels[0], kernels[1])  # per mouse
  assert np.abs(kernels).max() <= 2**-0.5  # PyTorch default U(±1/sqrt(fan_in))
  # Per mouse: (C + 4 + 1) per neuron + 152 for the grid predictor; padding not counted.
  assert readout.count_parameters(readouts, (3, 5)) == 13 * 8 + 2 * 152
  free = make_readouts(counts=(3, 5), free_mu=True)
  assert np.abs(free.mu[...]).max() <= 0.3 and free.grid_predictor is None
  assert readout.count_parameters(free, (3, 5)) == (8 + 4 + 1 + 2) * 8


def test_positions_clamp_before_shift_and_sample_noise():
  readouts = make_readouts(counts=(3,), free_mu=True)
  mouse = nnx.merge(*_mouse_slice(readouts, 0))
  mouse.mu[...] = jnp.array([[0.5, -0.2], [1.5, 0.0], [-3.0, 0.9]])
  mouse.sigma[...] = jnp.array([[[1.0, 2.0], [0.0, 1.0]]] * 3)
  np.testing.assert_allclose(mouse.positions(2, None)[1], [[0.5, -0.2], [1.0, 0.0], [-1.0, 0.9]])
  key = jax.random.key(3)
  z = jax.random.normal(key, (2, 3, 2))
  expected = np.clip(np.asarray(mouse.mu[...]) + np.stack(
      [z[..., 0] + 2 * z[..., 1], z[..., 1]], -1), -1, 1)
  np.testing.assert_allclose(mouse.positions(2, key), expected, rtol=1e-6)
  # The shift is added after the clamp: x 1.5 -> 1.0, +0.5 = 1.5 lies half a pixel outside the
  # map, so half the bilinear weight falls on zero padding (a clamp after the shift would give 4).
  feat = jnp.ones((1, 3, 3, 8))
  mouse.features[...] = jnp.ones((3, 8)) / 2
  y = mouse(feat, jnp.array([[0.5, 0.0]]), None)
  np.testing.assert_allclose(y[0], [4.0, 2.0, 4.0], rtol=1e-6)


def test_jitted_sampled_positions_equal_numpy_at_training_size():
  """32 trials x 800 neurons (past 2^14 positions, where XLA:CPU 0.10.2 miscompiled the earlier
  broadcast-multiply-sum form for a third of them), jitted as in the train step."""
  readouts = make_readouts(counts=(800,))
  mouse = nnx.merge(*_mouse_slice(readouts, 0))
  mouse.sigma[...] = 8 * mouse.sigma[...]   # wide enough that some positions are clamped
  key = jax.random.key(5)
  got = nnx.jit(lambda mouse, key: mouse.positions(32, key))(mouse, key)
  z = np.asarray(jax.random.normal(key, (32, 800, 2)), np.float64)
  sigma = np.asarray(mouse.sigma[...], np.float64)
  mu = np.asarray(mouse.mean_positions(), np.float64)
  expected = np.clip(mu + np.einsum("ncd,bnd->bnc", sigma, z), -1, 1)
  assert 0.01 < np.mean(np.abs(expected) == 1) < 0.5   # some positions are clamped
  np.testing.assert_allclose(got, expected, atol=1e-6)


def _mouse_slice(stacked, m):
  graphdef, state = nnx.split(stacked)
  return graphdef, jax.tree.map(lambda x: x[m], state)


@pytest.mark.parametrize("train", [False, True])
def test_vmapped_readouts_equal_loop_over_mice(train):
  readouts = make_readouts(counts=(3, 5))
  feat = jax.random.normal(jax.random.key(0), (2, 3, 4, 3, 8))  # the tiny core's map
  shift = 0.1 * jax.random.normal(jax.random.key(1), (2, 3, 2))
  keys = jax.random.split(jax.random.key(2), 2) if train else None
  stacked = nnx.jit(layers.apply_per_mouse)(readouts, feat, shift, keys)
  assert stacked.shape == (2, 3, 5)
  one_mouse = nnx.jit(lambda mouse, *args: mouse(*args))
  for m in range(2):
    mouse = nnx.merge(*_mouse_slice(readouts, m))
    expected = one_mouse(mouse, feat[m], shift[m], None if keys is None else keys[m])
    np.testing.assert_allclose(stacked[m], expected, rtol=1e-5, atol=1e-6)


def test_feature_l1_counts_real_neurons_only():
  readouts = make_readouts(counts=(3, 5))
  readouts.features[...] = readouts.features[...].at[0, 3:].set(100.0)  # padding of mouse 0
  np.testing.assert_allclose(readout.feature_l1(readouts, (3, 5)), [3.0, 5.0])
