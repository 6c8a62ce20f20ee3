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


def reference_metrics(pred, target, image_ids):
  """The Sensorium evaluator's formulas written out directly on full arrays."""
  ids = np.unique(image_ids)
  mean_p = np.stack([pred[image_ids == i].mean(0) for i in ids])
  mean_y = np.stack([target[image_ids == i].mean(0) for i in ids])
  noise_var = np.mean([target[image_ids == i].var(0, ddof=1) for i in ids], axis=0)
  total_var = target.var(0, ddof=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    fev = (total_var - noise_var) / total_var
  fev[target.std(0) <= 1e-8] = np.nan   # (numerically) constant: 0/0 in the challenge, dropped
  feve = 1 - (((target - pred) ** 2).mean(0) - noise_var) / (total_var - noise_var)
  return {"single_trial_correlation": metrics.correlation_reference(pred, target).mean(),
          "correlation_to_average": metrics.correlation_reference(mean_p, mean_y).mean(),
          "feve": feve[fev >= 0.15].mean()}


def test_tier_metrics_equal_the_evaluator_formulas():
  rng = np.random.default_rng(1)
  images, repeats, n = 12, 5, 9
  image_ids = np.repeat(rng.choice(1000, images, replace=False), repeats)
  rng.shuffle(image_ids)
  signal = rng.gamma(2.0, size=(1000, n))[image_ids]
  target = signal * rng.uniform(0.2, 3.0, size=n) + rng.normal(size=signal.shape)
  pred = signal + 0.5 * rng.normal(size=signal.shape)
  target[:, 0] = rng.normal(size=len(image_ids))   # a pure-noise neuron: FEV < 0.15, dropped
  acc = metrics.TierMetrics(n)
  for start in range(0, len(image_ids), 7):   # batches of 7 with 3 padding rows of garbage
    sl = slice(start, start + 7)
    k = len(image_ids[sl])
    pad = lambda a, fill: np.concatenate([a[sl], np.full((10 - k,) + a.shape[1:], fill)])  # noqa
    valid = np.arange(10) < k
    acc.add(pad(pred, 5.0), pad(target, -3.0), pad(image_ids, 7), valid)
  got, want = acc.result(), reference_metrics(pred, target, image_ids)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-9, err_msg=key)
  single = metrics.TierMetrics(n)
  single.add(pred[:30], target[:30], np.arange(30), np.ones(30, bool))
  assert np.isnan(single.result()["feve"])   # no repeats: FEVE undefined


def fev_neuron(delta2: float) -> np.ndarray:
  """Responses to two images x 2 repeats with FEV = 1 - 6 / (4 + delta2) (noise var 2, ddof 1)."""
  a, b = 0.0, np.sqrt(delta2)
  return np.array([a - 1, a + 1, b - 1, b + 1])


def test_fev_threshold_edge():
  # FEV 0.1501 is kept, FEV 0.1499 is dropped (the challenge keeps FEV >= 0.15).
  keep, drop = 6 / (1 - 0.1501) - 4, 6 / (1 - 0.1499) - 4
  target = np.stack([fev_neuron(keep), fev_neuron(drop)], axis=1)
  image_ids = np.array([3, 3, 8, 8])
  pred = target + np.array([[0.3, -0.2]] * 4)
  want = reference_metrics(pred, target, image_ids)
  acc = metrics.TierMetrics(2)
  acc.add(pred, target, image_ids, np.ones(4, bool))
  got = acc.result()
  np.testing.assert_allclose(got["feve"], want["feve"], rtol=1e-9)
  only_first = metrics.TierMetrics(1)
  only_first.add(pred[:, :1], target[:, :1], image_ids, np.ones(4, bool))
  np.testing.assert_allclose(got["feve"], only_first.result()["feve"], rtol=1e-12)
  none = metrics.TierMetrics(1)
  none.add(pred[:, 1:], target[:, 1:], image_ids, np.ones(4, bool))
  assert np.isnan(none.result()["feve"])   # no neuron passes: undefined


def test_sharded_sums_equal_unsharded():
  from jax.sharding import NamedSharding, PartitionSpec as P
  rng = np.random.default_rng(2)
  pred = rng.gamma(2.0, size=(3, 8, 11)).astype(np.float32)
  target = rng.normal(size=pred.shape).astype(np.float32)
  valid = rng.uniform(size=(3, 8)) > 0.2
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  on = NamedSharding(mesh, P(None, "data"))
  sharded = jax.jit(metrics.correlation_sums)(*(jax.device_put(x, on)
                                               for x in (pred, target, valid)))
  assert len(jax.device_put(pred, on).sharding.device_set) == 4
  np.testing.assert_allclose(np.asarray(sharded),
                             np.asarray(metrics.correlation_sums(pred, target, valid)), rtol=1e-6)


def test_silent_neuron_is_dropped_from_feve():
  # A silent neuron (responses ~1e-9, like the synthetic mice's) whose noise passes FEV >= 0.15
  # by chance: its FEVE would be ~ -1e17. Its total std is below the evaluator's 1e-8 eps for
  # "constant", so it counts as zero variance (NaN FEV, dropped), as in the challenge.
  image_ids = np.array([3, 3, 8, 8])
  keep = 6 / (1 - 0.1501) - 4   # FEV 0.1501 (fev_neuron)
  active, silent = fev_neuron(keep), 2e-9 + 1e-9 * fev_neuron(keep)
  target = np.stack([active, silent, 1e-3 * fev_neuron(keep)], axis=1)
  pred = target + np.array([[0.3, 0.05, 0.001]] * 4)
  acc = metrics.TierMetrics(3)
  acc.add(pred.astype(np.float32), target.astype(np.float32), image_ids, np.ones(4, bool))
  got, want = acc.result()["feve"], reference_metrics(pred, target, image_ids)["feve"]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.isfinite(got)
  kept = [1 - (((target[:, n] - pred[:, n]) ** 2).mean() - 2 * s**2) / (target[:, n].var(ddof=1)
          - 2 * s**2) for n, s in ((0, 1.0), (2, 1e-3))]   # noise var 2 s^2 by construction
  # The active and the small-but-real neuron (std 1e-3) only.
  np.testing.assert_allclose(got, np.mean(kept), rtol=1e-5)
  only_silent = metrics.TierMetrics(1)
  only_silent.add(pred[:, 1:2], target[:, 1:2], image_ids, np.ones(4, bool))
  assert np.isnan(only_silent.result()["feve"])
