"""Per-neuron correlation over a whole split, from sufficient statistics.

The original (and the Sensorium evaluator) correlates prediction and response per neuron over all
trials of a split: r = mean_t[(x - mean x) / (std x + 1e-8) * (y - mean y) / (std y + 1e-8)] with
population std (`model_spec.md` §8.4, `sensorium_format.md` §7). That equals
cov(x, y) / ((std x + 1e-8)(std y + 1e-8)), so each batch contributes only the sums
(n, Σx, Σy, Σxy, Σx², Σy²) per neuron: computed on device inside the jitted eval step (works on
sharded batches, padding rows masked) and accumulated on the host in float64, so the split never
has to sit in memory.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

EPS = 1e-8
NUM_SUMS = 6


def correlation_sums(pred_MxBxN, target_MxBxN, valid_MxB):
  """[M, 6, N] float32 sums of one batch: (n, Σx, Σy, Σxy, Σx², Σy²) over valid rows."""
  w = valid_MxB.astype(jnp.float32)[..., None]
  x, y = pred_MxBxN.astype(jnp.float32) * w, target_MxBxN.astype(jnp.float32) * w
  n = jnp.broadcast_to(w.sum(axis=1), x.shape[::2])
  return jnp.stack([n, x.sum(1), y.sum(1), (x * y).sum(1), (x * x).sum(1), (y * y).sum(1)], axis=1)


def correlation_from_sums(sums_Mx6xN: np.ndarray) -> np.ndarray:
  """[M, N] per-neuron correlation from accumulated sums (float64 on the host)."""
  s = np.asarray(sums_Mx6xN, np.float64)
  n = np.maximum(s[:, 0], 1.0)
  mx, my = s[:, 1] / n, s[:, 2] / n
  cov = s[:, 3] / n - mx * my
  sx = np.sqrt(np.maximum(s[:, 4] / n - mx * mx, 0.0))
  sy = np.sqrt(np.maximum(s[:, 5] / n - my * my, 0.0))
  return cov / ((sx + EPS) * (sy + EPS))


def mean_correlation(sums_Mx6xN: np.ndarray, neuron_counts) -> tuple[np.ndarray, float]:
  """Per mouse the mean over its real neurons, and the unweighted mean over mice."""
  corr = correlation_from_sums(sums_Mx6xN)
  per_mouse = np.array([corr[m, :n].mean() for m, n in enumerate(neuron_counts)])
  return per_mouse, float(per_mouse.mean())


def correlation_reference(pred_TxN: np.ndarray, target_TxN: np.ndarray) -> np.ndarray:
  """The evaluator's direct formula on full arrays (for tests and small splits)."""
  x, y = np.asarray(pred_TxN, np.float64), np.asarray(target_TxN, np.float64)
  zx = (x - x.mean(0)) / (x.std(0) + EPS)
  zy = (y - y.mean(0)) / (y.std(0) + EPS)
  return (zx * zy).mean(0)


class TierMetrics:
  """The challenge's three metrics for one mouse and tier, from sums accumulated batch by batch.

  Single-trial correlation as above; correlation to average over the per-image means (images in
  sorted id order, which the sums do not depend on); FEVE with ddof 1 for the noise and total
  variances and the FEV >= 0.15 neuron filter (`sensorium_format.md` §7); a neuron of
  (numerically) zero total variance (std <= 1e-8) has NaN FEV and is dropped, as in the challenge.
  All sums are float64. Memory is O(images x neurons), never O(trials x neurons).
  """

  def __init__(self, num_neurons: int):
    self.n = num_neurons
    self.corr_sums = np.zeros((NUM_SUMS, num_neurons))
    self._row: dict[int, int] = {}
    self._per_image: list[np.ndarray] = []   # per image: [5, N] count, Σy, Σy², Σŷ, Σ(y-ŷ)²

  def add(self, pred_BxN, target_BxN, image_ids_B, valid_B):
    keep = np.asarray(valid_B, bool)
    p = np.asarray(pred_BxN, np.float64)[keep][:, : self.n]
    y = np.asarray(target_BxN, np.float64)[keep][:, : self.n]
    self.corr_sums += np.stack([np.ones_like(p).sum(0), p.sum(0), y.sum(0), (p * y).sum(0),
                                (p * p).sum(0), (y * y).sum(0)])
    for image, pi, yi in zip(np.asarray(image_ids_B)[keep], p, y):
      row = self._row.setdefault(int(image), len(self._per_image))
      if row == len(self._per_image):
        self._per_image.append(np.zeros((5, self.n)))
      self._per_image[row] += np.stack([np.ones(self.n), yi, yi * yi, pi, (yi - pi) ** 2])

  def result(self) -> dict[str, float]:
    out = {"single_trial_correlation": float(correlation_from_sums(self.corr_sums[None])[0].mean())}
    s = np.stack(self._per_image)                  # [I, 5, N]
    count, sum_y, sum_y2, sum_p, sum_se = (s[:, k] for k in range(5))
    mean_y, mean_p = sum_y / count, sum_p / count
    out["correlation_to_average"] = float(correlation_reference(mean_p, mean_y).mean())
    trials = count.sum(0)
    repeated = count[:, 0] > 1
    if repeated.any():   # FEVE needs repeats (the test tiers); undefined on single presentations
      noise_var = ((sum_y2 - sum_y**2 / count)[repeated] / (count[repeated] - 1)).mean(0)
      total_var = (sum_y2.sum(0) - sum_y.sum(0) ** 2 / trials) / (trials - 1)
      with np.errstate(divide="ignore", invalid="ignore"):
        fev = (total_var - noise_var) / total_var
        feve = 1 - (sum_se.sum(0) / trials - noise_var) / (total_var - noise_var)
      # Zero total variance: the challenge's FEV is 0/0 = NaN and drops the neuron. A total std
      # at or below the evaluator's own eps for "constant" (1e-8, as in corr) is zero up to
      # rounding: a silent neuron (responses ~1e-9) whose FEV is noise and whose FEVE explodes
      # (-1e17) when that noise passes the threshold.
      fev = np.where(total_var > EPS**2, fev, np.nan)
      keep = fev >= 0.15   # NaN FEV fails the test
      out["feve"] = float(feve[keep].mean()) if keep.any() else float("nan")
    else:
      out["feve"] = float("nan")
    return out
