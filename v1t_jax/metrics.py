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
