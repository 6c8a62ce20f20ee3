"""Correlations from batched sufficient statistics equal the evaluator's direct formula."""

import jax
import numpy as np

from v1t_jax import metrics


def test_sums_over_batches_equal_direct_formula():
  rng = np.random.default_rng(0)
  m, t, n, b = 2, 53, 7, 8
  pred = rng.gamma(2.0, size=(m, t, n)).astype(np.float32)
  target = (pred * rng.uniform(0.5, 1.5, size=pred.shape) + rng.normal(size=pred.shape)).astype(
      np.float32)
  target[1, :, 3] = 1.0    # a constant neuron gives 0, not NaN (eps on each std)
  step = jax.jit(metrics.correlation_sums)
  total = np.zeros((m, metrics.NUM_SUMS, n))
  for start in range(0, t, b):   # padded last batch, padding masked
    valid = np.zeros((m, b), bool)
    k = min(b, t - start)
    valid[:, :k] = True
    p = np.zeros((m, b, n), np.float32)
    y = np.full((m, b, n), 99.0, np.float32)   # garbage in padding rows
    p[:, :k], y[:, :k] = pred[:, start:start + k], target[:, start:start + k]
    total += np.asarray(step(p, y, valid), np.float64)
  corr = metrics.correlation_from_sums(total)
  for mouse in range(m):
    np.testing.assert_allclose(corr[mouse], metrics.correlation_reference(pred[mouse], target[mouse]),
                               atol=2e-5)
  assert corr[1, 3] == 0.0
  per_mouse, mean = metrics.mean_correlation(total, [7, 5])
  np.testing.assert_allclose(per_mouse[1], corr[1, :5].mean())
  assert mean == per_mouse.mean()
