"""Gaussian2d readouts (model_spec.md §4): one per mouse, stacked on a leading mouse axis.

A mouse's readout maps the core's [B, h, w, C] map to [B, N] by bilinearly sampling it at one
learned position per neuron and taking a per-neuron weighted sum of the C channels plus a bias.
All mice are padded to N_max neurons; padded rows hold finite values (zero source grid, zero bias)
and are excluded by the neuron mask in the loss, the regulariser and the metrics.

Parameter layout per mouse (PyTorch name -> here): features (1, C, 1, N) -> features [N, C];
sigma (1, N, 2, 2) -> sigma [N, 2, 2]; bias (N,) -> bias [N]; _mu (1, N, 1, 2) -> mu [N, 2];
mu_transform.{0,2} -> grid_predictor.{fc1,fc2} (Flax kernels are the transposed weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v1t_jax import layers

GRID_PREDICTOR_HIDDEN = 30
# Top-level readout parameters with one entry per neuron (the rest are per mouse).
PER_NEURON_PARAMS = ("features", "sigma", "bias", "mu")


def bilinear_corners(grid_BxNx2: jax.Array, height: int, width: int):
  """Flat map indices [B, N, 4] and weights [B, N, 4] of the 4 bilinear neighbours.

  F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True) semantics: grid[..., 0]
  is x (width axis) and grid[..., 1] is y (height axis), both in [-1, 1] for the border pixel
  centres. Neighbours outside the map get weight 0 (their index is clipped to a valid one).
  Weights are written exactly as PyTorch's kernel does (nw = (x1 - ix) * (y1 - iy), ...), so
  values agree to rounding.
  """
  ix = (grid_BxNx2[..., 0] + 1.0) / 2.0 * (width - 1)
  iy = (grid_BxNx2[..., 1] + 1.0) / 2.0 * (height - 1)
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  x1, y1 = x0 + 1.0, y0 + 1.0
  corners = (
      (x0, y0, (x1 - ix) * (y1 - iy)),
      (x1, y0, (ix - x0) * (y1 - iy)),
      (x0, y1, (x1 - ix) * (iy - y0)),
      (x1, y1, (ix - x0) * (iy - y0)),
  )
  indices, weights = [], []
  for x, y, weight_BxN in corners:
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    indices.append((jnp.clip(y, 0, height - 1) * width + jnp.clip(x, 0, width - 1))
                   .astype(jnp.int32))
    weights.append(jnp.where(inside, weight_BxN, 0.0))
  return jnp.stack(indices, -1), jnp.stack(weights, -1)


def bilinear_sample(feat_BxHxWxC: jax.Array, grid_BxNx2: jax.Array) -> jax.Array:
  """F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True) -> [B, N, C].

  A gather of the 4 neighbours of every position and their weighted sum (`bilinear_corners`).
  """
  batch, height, width, channels = feat_BxHxWxC.shape
  index_BxNx4, weight_BxNx4 = bilinear_corners(grid_BxNx2, height, width)
  flat_BxPxC = feat_BxHxWxC.reshape(batch, height * width, channels)
  corners_BxNx4xC = jax.vmap(lambda f, i: f[i])(flat_BxPxC, index_BxNx4)
  return jnp.einsum("bnkc,bnk->bnc", corners_BxNx4xC, weight_BxNx4,
                    precision=jax.lax.Precision.HIGHEST)


def neuron_mask(neuron_counts: Sequence[int]) -> np.ndarray:
  """[M, N_max] bool, True for the real neurons of each mouse."""
  return np.arange(max(neuron_counts))[None, :] < np.asarray(neuron_counts)[:, None]


def source_grids(coordinates: np.ndarray, neuron_counts: Sequence[int], dim: int) -> np.ndarray:
  """Normalised cortical coordinates [M, N_max, dim] for the grid predictor (§4).

  Per mouse, over its real neurons only: the first `dim` columns, minus their column means,
  divided by the single largest |value|. Padded rows become 0. Computed in float64 then cast to
  float32 (the original stays in the coordinates' float32, so values may differ by ~1 ulp).
  """
  mask = neuron_mask(neuron_counts)
  grids = np.zeros(mask.shape + (dim,), np.float64)
  for m, count in enumerate(neuron_counts):
    xy = np.asarray(coordinates[m, :count, :dim], np.float64)
    xy = xy - xy.mean(axis=0, keepdims=True)
    scale = np.abs(xy).max()
    grids[m, :count] = xy / (scale if scale > 0 else 1.0)  # one neuron / identical coordinates: 0
  return grids.astype(np.float32)


def initial_bias(
    bias_mode: int,
    neuron_counts: Sequence[int],
    response_mean: np.ndarray | None,
    response_std: np.ndarray | None,
) -> np.ndarray:
  """[M, N_max] readout bias init: 0 zeros, 1 raw response mean, 2 mean / std; padding 0."""
  mask = neuron_mask(neuron_counts)
  if bias_mode == 0:
    return np.zeros(mask.shape, np.float32)
  if response_mean is None or (bias_mode == 2 and response_std is None):
    raise ValueError(f"bias_mode {bias_mode} needs response_mean (and response_std for mode 2)")
  for name, stats in (("response_mean", response_mean), ("response_std", response_std)):
    if stats is not None and np.shape(stats) != mask.shape:
      raise ValueError(f"{name} must have shape [M, N_max] = {mask.shape}, got {np.shape(stats)}")
  bias = np.asarray(response_mean, np.float64)
  if bias_mode == 2:
    bias = bias / np.where(mask, np.asarray(response_std, np.float64), 1.0)
  return np.where(mask, bias, 0.0).astype(np.float32)


class GridPredictor(nnx.Module):
  """mu_transform: Linear(dim -> 30), ELU, Linear(30 -> 2), tanh; PyTorch default init."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.fc1 = layers.torch_linear(dim, GRID_PREDICTOR_HIDDEN, rngs=rngs)
    self.fc2 = layers.torch_linear(GRID_PREDICTOR_HIDDEN, 2, rngs=rngs)

  def __call__(self, grid_Nxdim: jax.Array) -> jax.Array:
    return jnp.tanh(self.fc2(jax.nn.elu(self.fc1(grid_Nxdim))))


class Gaussian2d(nnx.Module):
  """FullGaussian2d readout of one mouse (build the stack with `make_readouts`)."""

  def __init__(
      self,
      source_grid_Nxdim: jax.Array | None,
      bias_N: jax.Array,
      *,
      num_channels: int,
      init_sigma: float,
      init_mu_range: float,
      rngs: nnx.Rngs,
  ):
    """source_grid None = `disable_grid_predictor` (a free mu)."""
    num_neurons = bias_N.shape[0]
    self.features = nnx.Param(
        jnp.full((num_neurons, num_channels), 1.0 / num_channels, jnp.float32))
    self.sigma = nnx.Param(
        layers.symmetric_uniform(init_sigma)(rngs.params(), (num_neurons, 2, 2)))
    self.bias = nnx.Param(jnp.asarray(bias_N, jnp.float32))
    if source_grid_Nxdim is None:
      self.mu = nnx.Param(layers.symmetric_uniform(init_mu_range)(rngs.params(), (num_neurons, 2)))
      self.source_grid = self.grid_predictor = None
    else:
      self.mu = None
      self.source_grid = layers.Buffer(jnp.asarray(source_grid_Nxdim, jnp.float32))
      self.grid_predictor = GridPredictor(source_grid_Nxdim.shape[-1], rngs=rngs)

  def mean_positions(self) -> jax.Array:
    """mu [N, 2]: predicted from the cortical coordinates, or the free parameter."""
    if self.grid_predictor is None:
      return self.mu[...]
    return self.grid_predictor(self.source_grid[...])

  def positions(self, batch: int, key: jax.Array | None) -> jax.Array:
    """[B, N, 2]: clamp(mu + sigma z, -1, 1), z ~ N(0, I) per image and neuron; key None: clamp(mu).

    Clipping in the forward pass matches the original: its in-place clamp of mu has no lasting
    effect (mu is recomputed every call) and the clamp of the sampled position is what counts.
    """
    mu_Nx2 = self.mean_positions()
    if key is None:
      return jnp.broadcast_to(jnp.clip(mu_Nx2, -1.0, 1.0), (batch,) + mu_Nx2.shape)
    z_BxNx2 = jax.random.normal(key, (batch,) + mu_Nx2.shape)
    # (sigma_n z)_c = sigma[n, c, 0] z_0 + sigma[n, c, 1] z_1, written out: XLA:CPU (jaxlib
    # 0.10.2) miscompiles the broadcast-multiply-sum form beyond 2^14 positions (docs/fidelity.md).
    sigma_1xNx2x2 = self.sigma[...][None]
    offset_BxNx2 = (sigma_1xNx2x2[..., 0] * z_BxNx2[:, :, 0:1]
                    + sigma_1xNx2x2[..., 1] * z_BxNx2[:, :, 1:2])
    return jnp.clip(mu_Nx2 + offset_BxNx2, -1.0, 1.0)

  def __call__(
      self, feat_BxHxWxC: jax.Array, shift_Bx2: jax.Array | None, key: jax.Array | None
  ) -> jax.Array:
    """Pre-activation responses [B, N]. key: PRNG key for a training sample, None for eval."""
    grid_BxNx2 = self.positions(feat_BxHxWxC.shape[0], key)
    if shift_Bx2 is not None:  # added after the clamp: positions may leave [-1, 1] (zero padding)
      grid_BxNx2 = grid_BxNx2 + shift_Bx2[:, None, :]
    sampled_BxNxC = bilinear_sample(feat_BxHxWxC, grid_BxNx2)
    return jnp.einsum("bnc,nc->bn", sampled_BxNxC, self.features[...],
                      precision=jax.lax.Precision.HIGHEST) + self.bias[...]


def make_readouts(
    *,
    neuron_counts: Sequence[int],
    coordinates: np.ndarray,
    bias_MxN: np.ndarray,
    num_channels: int,
    disable_grid_predictor: bool,
    grid_predictor_dim: int,
    init_sigma: float,
    init_mu_range: float,
    rngs: nnx.Rngs,
) -> Gaussian2d:
  """All mice's readouts as one Gaussian2d with a leading mouse axis on every Variable."""
  num_mice, n_max = len(neuron_counts), max(neuron_counts)
  if coordinates.shape[:2] != (num_mice, n_max) or coordinates.shape[2] < grid_predictor_dim:
    raise ValueError(f"coordinates must be [{num_mice}, {n_max}, >={grid_predictor_dim}], "
                     f"got {coordinates.shape}")

  def make(grid, bias, *, rngs):
    return Gaussian2d(grid, bias, num_channels=num_channels, init_sigma=init_sigma,
                      init_mu_range=init_mu_range, rngs=rngs)

  grids = None if disable_grid_predictor else jnp.asarray(
      source_grids(coordinates, neuron_counts, grid_predictor_dim))
  return layers.stack_per_mouse(make, num_mice, rngs, grids, jnp.asarray(bias_MxN))


def feature_l1(readouts: Gaussian2d, neuron_counts: Sequence[int]) -> jax.Array:
  """[M] sum of |features| over each mouse's real neurons (the original's readout regulariser)."""
  mask_MxN = neuron_mask(neuron_counts)
  return jnp.sum(jnp.abs(readouts.features[...]) * mask_MxN[..., None], axis=(1, 2))


def count_parameters(readouts: Gaussian2d, neuron_counts: Sequence[int]) -> int:
  """Real readout parameters of all mice: per-neuron entries only for real neurons (160 N + 152)."""
  total = 0
  for path, param in nnx.to_flat_state(nnx.state(readouts, nnx.Param)):
    shape = param.get_value().shape  # [M, N_max, ...] for per-neuron params, [M, ...] otherwise
    if len(path) == 1 and path[0] in PER_NEURON_PARAMS:
      total += sum(neuron_counts) * int(np.prod(shape[2:], dtype=np.int64))
    else:
      total += int(np.prod(shape, dtype=np.int64))
  return total
