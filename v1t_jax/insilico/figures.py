"""Figures of in-silico experiments: MEI grids, receptive-field maps with fitted ellipses, tuning
curves. Plain arrays in, matplotlib Figures out (Agg canvas; `v1t_jax.figures.save_png`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from v1t_jax.figures import new_figure

MAX_PANELS = 32


def _grid(n: int, cols: int) -> tuple[int, int]:
  cols = max(1, min(cols, n))
  return math.ceil(n / cols), cols


def _image(ax, image_HxWxC, lim=None, cmap="gray"):
  x = np.asarray(image_HxWxC)
  x = x.mean(axis=-1) if x.ndim == 3 else x
  lim = lim or float(np.abs(x).max()) or 1.0
  ax.imshow(x, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
  ax.set_xticks([]), ax.set_yticks([])


def plot_meis(result: dict, title: str = "Most exciting inputs") -> Figure:
  """Rows: neurons (at most MAX_PANELS), columns: seeds; each panel titled with its activation."""
  images, act = result["images"], result["activations"]
  neurons = result["neurons"][:MAX_PANELS]
  n, s = len(neurons), images.shape[1]
  h, w = images.shape[2:4]
  fig = new_figure(1.4 * s * w / h + 0.6, 1.0 * n + 0.6)
  axes = fig.subplots(n, s, squeeze=False)
  for i, neuron in enumerate(neurons):
    lim = float(np.abs(images[i]).max()) or 1.0
    for j in range(s):
      ax = axes[i, j]
      _image(ax, images[i, j], lim)
      ax.set_title(f"n{neuron} s{int(result['seeds'][j])}: {act[i, j]:.2f}", fontsize=6)
  fig.suptitle(f"{title} (model-input units; title: activation)", fontsize=8)
  return fig


def plot_receptive_fields(result: dict, maps: Sequence[str] = ("sta", "sta2", "combined", "grad"),
                          true_centers=None, title: str = "Receptive fields") -> Figure:
  """One row per neuron (at most MAX_PANELS), one column per map, with the fitted Gaussian's
  1- and 2-sigma ellipses (red) and the true centre (cyan +) when given."""
  maps = [m for m in maps if m in result["maps"]]
  neurons = result["neurons"][:MAX_PANELS]
  h, w = result["maps"][maps[0]].shape[1:3]
  fig = new_figure(1.5 * len(maps) * w / h + 0.6, 0.95 * len(neurons) + 0.6)
  axes = fig.subplots(len(neurons), len(maps), squeeze=False)
  for i, neuron in enumerate(neurons):
    for j, name in enumerate(maps):
      ax = axes[i, j]
      _image(ax, result["maps"][name][i], cmap="RdBu_r")
      fit = result.get("fits", {}).get(name)
      if fit is not None and np.isfinite(fit[i, 1]):
        _, x0, y0, sx, sy, theta, _, r2 = fit[i]
        for k in (1, 2):
          ax.add_patch(Ellipse((x0, y0), 2 * k * sx, 2 * k * sy, angle=np.degrees(theta),
                               fill=False, color="red", lw=0.6))
        label = f"R2 {r2:.2f}"
      else:
        label = "no fit"
      if true_centers is not None:
        cx, cy = true_centers[int(neuron)]
        ax.plot([cx], [cy], "+", color="cyan", ms=5, mew=0.8)
      ax.set_title(f"n{neuron} {name}: {label}", fontsize=6)
  fig.suptitle(f"{title} (red: fitted Gaussian 1 and 2 sd" +
               (", cyan: true centre)" if true_centers is not None else ")"), fontsize=8)
  return fig


def plot_tuning(result: dict, title: str = "Grating tuning") -> Figure:
  """Per neuron (at most MAX_PANELS / 2): orientation tuning at the preferred SF (phase peak and
  phase mean), and the response over phase at the preferred grating (F1/F0 in the title)."""
  r = result["responses"]
  neurons = result["neurons"][: MAX_PANELS // 2]
  ori = np.degrees(result["orientations"])
  ph = np.degrees(result["phases"])
  rows, cols = _grid(len(neurons), 4)
  fig = new_figure(3.2 * cols, 1.6 * rows + 0.5)
  sub = fig.subfigures(rows, cols, squeeze=False)
  for i, neuron in enumerate(neurons):
    ax1, ax2 = sub[i // cols, i % cols].subplots(1, 2)
    peak = r[i].max(axis=2)
    o_i, f_i = np.unravel_index(np.argmax(peak), peak.shape)
    ax1.plot(ori, peak[:, f_i], "-o", ms=2, lw=0.8, label="phase peak")
    ax1.plot(ori, r[i, :, f_i].mean(axis=1), "-", lw=0.8, label="phase mean")
    ax1.axhline(result["grey"][i], color="gray", lw=0.5, ls="--")
    ax1.axvline(np.degrees(result["preferred_orientation"][i]), color="red", lw=0.6)
    ax1.set_title(f"n{neuron}: {result['preferred_sf'][i]:.3f} c/px, OSI "
                  f"{result['osi'][i]:.2f}", fontsize=6)
    ax1.set_xlabel("orientation (deg)", fontsize=6)
    ax2.plot(ph, r[i, o_i, f_i], "-o", ms=2, lw=0.8)
    ax2.axhline(result["grey"][i], color="gray", lw=0.5, ls="--")
    kind = "simple" if result["is_simple"][i] else "complex"
    ax2.set_title(f"F1/F0 {result['f1_f0'][i]:.2f} ({kind})", fontsize=6)
    ax2.set_xlabel("phase (deg)", fontsize=6)
    for ax in (ax1, ax2):
      ax.tick_params(labelsize=5)
  fig.suptitle(f"{title} (dashed: response to grey)", fontsize=8)
  return fig


def plot_recovery(per_model: dict, title: str = "Recovery of the ground truth") -> Figure:
  """Histograms of RF-centre and orientation errors for the trained and ground-truth models."""
  fig = new_figure(8.0, 2.6)
  ax1, ax2, ax3 = fig.subplots(1, 3)
  for name, rec in per_model.items():
    p = rec["per_neuron"]
    err = np.nan_to_num(p["rf_center_error_px"], nan=99.0)
    ax1.hist(np.minimum(err, 20), bins=40, range=(0, 20), histtype="step", label=name)
    ax2.hist(p["orientation_error_deg"], bins=30, range=(0, 90), histtype="step", label=name)
    ax3.hist(np.log2(p["sf_ratio"]), bins=30, range=(-2, 2), histtype="step", label=name)
  ax1.set_xlabel("RF centre error (model px, 20 = 20+)", fontsize=7)
  ax2.set_xlabel("preferred orientation error (deg)", fontsize=7)
  ax3.set_xlabel("log2(preferred SF / true SF)", fontsize=7)
  ax1.legend(fontsize=6)
  for ax in (ax1, ax2, ax3):
    ax.tick_params(labelsize=6)
  fig.suptitle(title, fontsize=8)
  return fig
