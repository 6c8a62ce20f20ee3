r"""PNG figures of a trained run: attention rollout, best neurons, readout positions, curves.

  python -m v1t_jax.figures --workdir runs/demo
  python -m v1t_jax.figures --workdir runs/v1t --data_dir data/sensorium_tfds --tier validation \
      --out runs/v1t/figures --num_images 4 --num_neurons 4

Writes into `--out` (default `<workdir>/figures`):
  rollout_<mouse>.png     the first images of the tier, their attention rollout (model_spec.md
                          §9.1) and the overlay;
  responses_<mouse>.png   predicted vs recorded standardised responses of the mouse's best
                          neurons (highest single-trial correlation over the tier) and a
                          median neuron, next to the distribution of all neurons' r;
  readout_positions.png   each mouse's readout mean positions on the core's h x w feature map,
                          coloured by the neuron's correlation;
  training_curves.png     losses, validation correlation and learning rate from the run's
                          TensorBoard event files.
The response figure also shows a median neuron and the distribution of every neuron's r (and the
oracle's, the noise-free truth's r, for synthetic data whose `.truth.npz` files exist).
Without the dataset (no `--data_dir` and the config's path missing) only the last two are made and
each PNG not written is named on stderr with its reason (an explicit `--data_dir` without a
dataset is an error).

The plotting functions take plain arrays and return matplotlib Figures (Agg canvas, no pyplot
state); `to_rgb` turns a Figure into a uint8 [H, W, 3] array for clu's `writer.write_images`, and
`summary_images` makes the per-epoch TensorBoard images of a training run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

DPI = 100
RECORDED_COLOR, PREDICTED_COLOR = "orangered", "dodgerblue"   # the original's colours
HEAT_CMAP = "turbo"                                           # the original's COLORMAP
MAX_TRACE_TRIALS = 100
SILENT_STD = 1e-6   # standardised units: a neuron below this over a tier is treated as silent


# ---------------------------------------------------------------------------------------------
# Figure <-> pixels.


def new_figure(width_in: float, height_in: float) -> Figure:
  """A Figure on its own Agg canvas: no pyplot, no global backend, nothing to close."""
  fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def to_rgb(fig: Figure) -> np.ndarray:
  """The rendered figure as uint8 [H, W, 3] (what clu's write_images takes, with a [None])."""
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Figure, path: str) -> str:
  """PNG of exactly figsize x dpi pixels (no tight bbox, so sizes are predictable)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI, format="png")
  return path


# ---------------------------------------------------------------------------------------------
# Figures on plain arrays.


def _display(image_HxWxC: np.ndarray) -> tuple[np.ndarray, float, float]:
  """Grey image (channel mean) and a robust grey range (1st-99th percentile)."""
  gray = np.asarray(image_HxWxC, np.float32).mean(axis=-1)
  low, high = np.percentile(gray, [1, 99])
  return gray, float(low), float(high if high > low else low + 1.0)


def plot_rollout(images_NxHxWxC: np.ndarray, heatmaps_NxHxW: np.ndarray,
                 row_titles: Sequence[str], title: str) -> Figure:
  """One row per image: model input, rollout heat map, overlay (heat over the image)."""
  n = len(images_NxHxWxC)
  height, width = np.shape(heatmaps_NxHxW)[1:]
  panel_h = 3.0 * height / width
  fig = new_figure(9.6, n * (panel_h + 0.45) + 0.5)
  axes = fig.subplots(n, 3, squeeze=False)
  heat_image = None
  for i in range(n):
    gray, low, high = _display(images_NxHxWxC[i])
    axes[i, 0].imshow(gray, cmap="gray", vmin=low, vmax=high)
    heat_image = axes[i, 1].imshow(heatmaps_NxHxW[i], cmap=HEAT_CMAP, vmin=0.0, vmax=1.0)
    axes[i, 2].imshow(gray, cmap="gray", vmin=low, vmax=high)
    axes[i, 2].imshow(heatmaps_NxHxW[i], cmap=HEAT_CMAP, vmin=0.0, vmax=1.0, alpha=0.5)
    axes[i, 0].set_title(row_titles[i], fontsize=9, loc="left")
    for ax in axes[i]:
      ax.set_xticks([])
      ax.set_yticks([])
  for ax, label in zip(axes[-1], ("model input", "attention rollout", "overlay")):
    ax.set_xlabel(label, fontsize=9)
  fig.colorbar(heat_image, ax=axes[:, 1:], shrink=0.8, label="rollout (min-max)")
  fig.suptitle(title, fontsize=11)
  return fig


def best_neurons(correlations_N: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k highest correlations (NaN last), best first."""
  c = np.where(np.isfinite(correlations_N), correlations_N, -np.inf)
  return np.argsort(-c, kind="stable")[:k]


def plot_responses(recorded_TxK: np.ndarray, predicted_TxK: np.ndarray,
                   column_titles: Sequence[str], title: str,
                   max_trials: int = MAX_TRACE_TRIALS,
                   correlations: np.ndarray | None = None,
                   oracle_correlations: np.ndarray | None = None) -> Figure:
  """Per neuron (column): predicted vs recorded scatter over all trials, and both traces over
  the first `max_trials` trials.

  correlations: every neuron's r (NaN: silent); adds a last panel, right of the columns, with
  their distribution (and that of `oracle_correlations`, the noise-free truth's, if given).
  """
  trials, k = np.shape(recorded_TxK)
  extra = correlations is not None
  fig = new_figure(max(3.0 * (k + extra), 6.0), 5.6)
  grid = fig.add_gridspec(2, k + extra)
  axes = np.array([[fig.add_subplot(grid[r, j]) for j in range(k)] for r in range(2)])
  shown = min(trials, max_trials)
  for j in range(k):
    rec, pred = recorded_TxK[:, j], predicted_TxK[:, j]
    top, bottom = axes[0, j], axes[1, j]
    top.scatter(rec, pred, s=10, alpha=0.6, color=PREDICTED_COLOR, edgecolors="none")
    low, high = min(rec.min(), pred.min(), 0.0), max(rec.max(), pred.max(), 1e-6)
    margin = 0.05 * (high - low)   # keeps points on the axes' edges visible
    lim = (low - margin, high + margin)
    top.plot(lim, lim, color="0.5", lw=0.8, ls="--")   # identity: perfect prediction
    top.set_xlim(lim)
    top.set_ylim(lim)
    top.set_title(column_titles[j], fontsize=9)
    top.set_xlabel("recorded", fontsize=9)
    marker = "." if shown <= 30 else None
    for values, color, label in ((rec, RECORDED_COLOR, "recorded"),
                                 (pred, PREDICTED_COLOR, "predicted")):
      bottom.plot(np.arange(shown), values[:shown], color=color, lw=1.0, marker=marker,
                  label=label)
    bottom.set_xlabel("trial (tier order)", fontsize=9)
    for ax in (top, bottom):
      ax.tick_params(labelsize=8)
      ax.spines[["top", "right"]].set_visible(False)
  axes[0, 0].set_ylabel("predicted", fontsize=9)
  axes[1, 0].set_ylabel("standardised response", fontsize=9)
  axes[1, 0].legend(fontsize=8, frameon=False)
  if extra:
    plot_correlation_distribution(fig.add_subplot(grid[:, k]), correlations,
                                  oracle_correlations)
  fig.suptitle(title, fontsize=11)
  return fig


DISTRIBUTION_TITLE = "per-neuron r, all neurons"


def plot_correlation_distribution(ax, correlations: np.ndarray,
                                  oracle_correlations: np.ndarray | None = None) -> None:
  """Cumulative distribution of per-neuron r (NaN left out), median as a dashed line.

  Line data: x = the finite correlations sorted, y = fraction of neurons at or below.
  """
  for values, color, label in ((correlations, PREDICTED_COLOR, "model"),
                               (oracle_correlations, "0.2", "oracle")):
    if values is None:
      continue
    r = np.sort(np.asarray(values, np.float64)[np.isfinite(values)])
    if not r.size:
      continue
    median = float(np.median(r))
    ax.plot(r, np.arange(1, len(r) + 1) / len(r), color=color, lw=1.5,
            label=f"{label}: median {median:.3f} (n = {len(r)})")
    ax.axvline(median, color=color, lw=0.8, ls="--")
  ax.set_title(DISTRIBUTION_TITLE, fontsize=9)
  ax.set_xlabel("single-trial r", fontsize=9)
  ax.set_ylabel("fraction of neurons", fontsize=9)
  ax.set_ylim(0, 1.02)
  ax.tick_params(labelsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, frameon=False, loc="upper left")


def median_neuron(correlations_N: np.ndarray) -> int | None:
  """Index of the neuron whose r is nearest the median r (NaN ignored); None if all NaN."""
  c = np.asarray(correlations_N, np.float64)
  if not np.isfinite(c).any():
    return None
  return int(np.nanargmin(np.abs(c - np.nanmedian(c))))


def grid_to_map(positions_Nx2: np.ndarray, map_hw: Sequence[int]) -> np.ndarray:
  """Readout grid coordinates (x, y) in [-1, 1] -> (column, row) on the h x w map.

  grid_sample with align_corners=True: -1 and 1 are the centres of the border cells.
  """
  h, w = map_hw
  xy = np.asarray(positions_Nx2, np.float64)
  return np.stack([(xy[:, 0] + 1) / 2 * (w - 1), (xy[:, 1] + 1) / 2 * (h - 1)], axis=1)


def plot_readout_positions(positions: Mapping[str, np.ndarray], map_hw: Sequence[int],
                           colors: Mapping[str, np.ndarray] | None = None,
                           color_label: str = "") -> Figure:
  """One panel per mouse: neuron mean positions on the feature map (row 0 at the top)."""
  h, w = map_hw
  names = list(positions)
  cols = min(len(names), 3)
  rows = math.ceil(len(names) / cols)
  panel_w = 4.2
  fig = new_figure(panel_w * cols + (1.0 if colors else 0.0), rows * (panel_w * h / w + 0.75) + 0.4)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  values = np.concatenate([colors[n] for n in names]) if colors else np.zeros(0)
  vmin, vmax = ((np.nanmin(values), np.nanmax(values)) if values.size and np.isfinite(values).any()
                else (0.0, 1.0))
  dots = None
  for ax, name in zip(axes, names):
    cr = grid_to_map(positions[name], map_hw)
    ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, color="0.4", lw=1.0))
    if colors:   # best neurons drawn last (on top); NaN (silent over the tier) first, in grey
      value = np.asarray(colors[name], np.float64)
      order = np.argsort(np.where(np.isfinite(value), value, -np.inf), kind="stable")
      cr, value = cr[order], value[order]
      kwargs = dict(c=value, cmap=colormaps["viridis"].with_extremes(bad="0.75"),
                    vmin=vmin, vmax=vmax, plotnonfinite=True)
    else:
      kwargs = dict(color=PREDICTED_COLOR)
    size = float(np.clip(3000 / max(len(cr), 1), 2, 10))   # thousands of neurons: small dots
    dots = ax.scatter(cr[:, 0], cr[:, 1], s=size, alpha=0.8, edgecolors="none", **kwargs)
    ax.set_xlim(-0.5 - 0.03 * w, w - 0.5 + 0.03 * w)
    ax.set_ylim(h - 0.5 + 0.03 * h, -0.5 - 0.03 * h)   # image convention: row 0 at the top
    ax.set_aspect("equal")
    ax.set_title(f"{name}: {len(cr)} neurons", fontsize=10)
    ax.set_xlabel(f"feature map column (w = {w})", fontsize=9)
    ax.set_ylabel(f"row (h = {h})", fontsize=9)
    ax.tick_params(labelsize=8)
  for ax in axes[len(names):]:
    ax.set_visible(False)
  if colors and dots is not None:
    fig.colorbar(dots, ax=axes[: len(names)].tolist(), shrink=0.8, label=color_label)
  fig.suptitle("Readout mean positions (before the shifter)", fontsize=11)
  return fig


# (title, y label, log y, tags); a tag ending in "/*" means every per-mouse tag under it.
CURVE_PANELS = (
    ("training loss", "loss (per batch sum)", False, ("train/loss",)),
    ("Poisson loss", "Poisson loss", False, ("train/poisson", "val/poisson_loss/average")),
    ("validation correlation", "single-trial correlation", False,
     ("val/single_trial_correlation/*", "val/single_trial_correlation/average")),
    ("learning rate", "learning rate", True, ("train/lr",)),
)


def _panel_tags(pattern: str, available: Sequence[str]) -> list[str]:
  """The tags of a CURVE_PANELS entry that the run has ("x/*": one level below x/, no average)."""
  if not pattern.endswith("/*"):
    return [pattern] if pattern in available else []
  prefix = pattern[:-1]
  return sorted(t for t in available if t.startswith(prefix)
                and "/" not in t[len(prefix):] and not t.endswith("/average"))


def plot_training_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                         title: str = "Training curves") -> Figure:
  """Loss, Poisson loss, validation correlation (average bold, mice thin) and lr against step."""
  panels = [(t, y, log, [tag for p in tags for tag in _panel_tags(p, list(curves))])
            for t, y, log, tags in CURVE_PANELS]
  panels = [p for p in panels if p[3]]
  if not panels:
    raise ValueError(f"no training scalars to plot (known tags: {sorted(curves)[:10]})")
  cols = min(len(panels), 2)
  rows = math.ceil(len(panels) / cols)
  fig = new_figure(5.2 * cols, 3.4 * rows + 0.4)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, (panel_title, ylabel, log, tags) in zip(axes, panels):
    for tag in tags:
      steps, values = curves[tag]
      per_mouse = tag.count("/") == 2 and not tag.endswith("/average")
      ax.plot(steps, values, marker="." if len(steps) < 30 else None,
              lw=0.8 if per_mouse else 1.8, alpha=0.6 if per_mouse else 1.0,
              label=tag.rsplit("/", 1)[-1] if per_mouse else tag)
    if log and all(np.all(curves[t][1] > 0) for t in tags):
      ax.set_yscale("log")
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  fig.suptitle(title, fontsize=11)
  return fig


# ---------------------------------------------------------------------------------------------
# Reading a run.


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every scalar of the event files in `workdir`: tag -> (steps, values), sorted by step.

  clu writes TF2 summaries, which TensorBoard stores as tensors, not legacy scalars. A resumed
  run writes a new event file and may repeat steps: the value written last wins.
  """
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0, "scalars": 0})
  acc.Reload()
  events = {}
  for tag in acc.Tags().get("tensors", []):
    for e in acc.Tensors(tag):
      value = tensor_util.make_ndarray(e.tensor_proto)
      if value.shape == () and np.issubdtype(value.dtype, np.number):
        events.setdefault(tag, []).append((e.wall_time, e.step, float(value)))
  for tag in acc.Tags().get("scalars", []):
    events.setdefault(tag, []).extend((e.wall_time, e.step, e.value) for e in acc.Scalars(tag))
  out = {}
  for tag, rows in events.items():
    by_step = {step: value for _, step, value in sorted(rows)}   # later wall time overwrites
    steps = np.array(sorted(by_step), np.int64)
    out[tag] = steps, np.array([by_step[s] for s in steps], np.float64)
  return out


def readout_positions(model) -> list[np.ndarray]:
  """Each mouse's readout mean positions [N_m, 2] (x, y in [-1, 1]) from a V1T model."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(model.readouts)
  mu_MxNx2 = jax.vmap(lambda s: nnx.merge(graphdef, s).mean_positions())(state)
  mu_MxNx2 = np.asarray(mu_MxNx2)
  return [mu_MxNx2[m, :n] for m, n in enumerate(model.neuron_counts)]


@dataclasses.dataclass
class MouseTier:
  """What the figures need of one mouse and tier (standardised responses, model inputs)."""
  name: str
  neuron_ids: np.ndarray          # [N]
  recorded: np.ndarray            # [trials, N]
  predicted: np.ndarray           # [trials, N]
  images: np.ndarray              # [k, H, W, C] the first k trials of the tier
  heatmaps: np.ndarray | None     # [k, H, W] their attention rollout (None: core without)
  trials: np.ndarray              # [k] trial ids (file numbers in the source zip)
  image_ids: np.ndarray           # [k]
  oracle: np.ndarray | None = None   # [trials, N] noise-free truth of the tier (synthetic data)

  @property
  def oracle_correlations(self) -> np.ndarray | None:
    """Per-neuron r of the noise-free truth with the recorded responses (the ceiling)."""
    if self.oracle is None:
      return None
    from v1t_jax import metrics
    corr = metrics.correlation_reference(self.oracle, self.recorded)
    return np.where(self.recorded.std(axis=0) > SILENT_STD, corr, np.nan)

  @property
  def correlations(self) -> np.ndarray:
    """Single-trial correlation per neuron; NaN for neurons silent over the tier.

    The evaluator's eps turns a silent neuron's correlation into noise (std ~1e-9 gives r of
    either sign), which must not rank it among the best.
    """
    from v1t_jax import metrics
    corr = metrics.correlation_reference(self.predicted, self.recorded)
    return np.where(self.recorded.std(axis=0) > SILENT_STD, corr, np.nan)


def collect_tier(predictor, mice, tier: str, num_images: int,
                 truth: Mapping[str, np.ndarray] | None = None) -> list[MouseTier]:
  """Predictions for every trial of `tier` and the rollout of its first `num_images` trials.

  truth: {mouse: standardised noise-free rates [file trials, N]} (synthetic data) for the oracle.

  Reads the converted dataset through the input pipeline (normalised like training) and runs the
  Predictor's one-mouse forward, so predictions equal the training-time evaluation.
  """
  from v1t_jax import input_pipeline, rollout

  ds, _ = input_pipeline.eval_dataset(list(mice), tier, predictor.config.data)
  rows = [{"recorded": [], "predicted": [], "first": [], "trial": []} for _ in mice]
  for batch in input_pipeline.as_numpy(ds):
    for m, meta in enumerate(mice):
      keep = np.asarray(batch["valid"][m], bool)
      if not keep.any():
        continue
      # The whole batch, padding rows included: one batch shape, so one compilation.
      pred = predictor.predict_model_inputs(
          meta.name, *(batch[k][m] for k in ("image", "behavior", "pupil_center")),
          batch_size=len(keep))
      inputs = [np.asarray(batch[k][m][keep]) for k in ("image", "behavior", "pupil_center")]
      rows[m]["predicted"].append(pred[keep])
      rows[m]["trial"].append(np.asarray(batch["trial"][m][keep]))
      rows[m]["recorded"].append(np.asarray(batch["responses"][m][keep][:, : meta.num_neurons]))
      missing = num_images - sum(len(f[0]) for f in rows[m]["first"])
      if missing > 0:
        rows[m]["first"].append([x[:missing] for x in inputs]
                                + [np.asarray(batch[k][m][keep][:missing])
                                   for k in ("trial", "image_id")])
  out = []
  for m, meta in enumerate(mice):
    if not rows[m]["predicted"]:
      continue   # an empty tier for this mouse
    image, behavior, pupil, trial, image_id = (np.concatenate(x) for x in zip(*rows[m]["first"]))
    heat = []
    for i in range(len(image) if getattr(predictor.model.core, "has_attention", False) else 0):
      # one image at a time: attention is [L, H, T, T] per image
      _, attention = predictor.predict_model_inputs(
          meta.name, image[i:i + 1], behavior[i:i + 1], pupil[i:i + 1], batch_size=1,
          return_attention=True)
      heat.append(np.asarray(rollout.attention_rollout(attention[0], image.shape[1:3])))
    rates = (truth or {}).get(meta.name)
    oracle = None if rates is None else rates[np.concatenate(rows[m]["trial"])]
    out.append(MouseTier(meta.name, predictor.neuron_ids(meta.name),
                         np.concatenate(rows[m]["recorded"]), np.concatenate(rows[m]["predicted"]),
                         image, np.stack(heat) if heat else None, trial, image_id, oracle))
  return out


# ---------------------------------------------------------------------------------------------
# All figures of a model.


def tier_figures(tiers: Sequence[MouseTier], tier: str, num_neurons: int,
                 skipped: dict[str, str] | None = None) -> dict[str, Figure]:
  """rollout/<mouse> and responses/<mouse> figures (the `num_neurons` best and a median neuron,
  next to the distribution of every neuron's r and the oracle's); `skipped` gets the reasons."""
  figs = {}
  for t in tiers:
    titles = [f"{t.name}  trial {tr}  (image {im})" for tr, im in zip(t.trials, t.image_ids)]
    if t.heatmaps is None:
      if skipped is not None:
        skipped[f"rollout/{t.name}"] = "the model's core has no attention maps"
    else:
      figs[f"rollout/{t.name}"] = plot_rollout(
          t.images, t.heatmaps, titles, f"Attention rollout, mouse {t.name} ({tier})")
    corr = t.correlations
    best = best_neurons(corr, num_neurons)
    best = best[np.isfinite(corr[best])]
    if not best.size:   # e.g. the withheld test responses of the competition mice
      reason = f"mouse {t.name} has no recorded {tier} responses"
      if skipped is not None:
        skipped[f"responses/{t.name}"] = reason
      else:
        print(f"figures: {reason}; no response figure", file=sys.stderr)
      continue
    titles = [f"{t.name} neuron {t.neuron_ids[j]} (best {i + 1})\nr = {corr[j]:.3f}"
              for i, j in enumerate(best)]
    median = median_neuron(corr)
    if median not in best:   # a typical neuron, not only the flattering ones
      best = np.append(best, median)
      titles.append(f"{t.name} neuron {t.neuron_ids[median]} (median)\nr = {corr[median]:.3f}")
    oracle = t.oracle_correlations
    figs[f"responses/{t.name}"] = plot_responses(
        t.recorded[:, best], t.predicted[:, best], titles,
        f"Mouse {t.name}: best and median of {len(corr)} neurons ({tier}, single-trial r; "
        f"median {np.nanmedian(corr):.3f}, mean {np.nanmean(corr):.3f} over "
        f"{np.isfinite(corr).sum()} active neurons"
        + (f"; oracle median {np.nanmedian(oracle):.3f})" if oracle is not None else ")"),
        correlations=corr, oracle_correlations=oracle)
  return figs


def synthetic_truth(config, mice) -> dict[str, np.ndarray]:
  """{mouse: standardised noise-free rates [file trials, N]} of a synthetic config's mice whose
  `<zip>.truth.npz` is in config.synthetic.zip_dir ({} for real data)."""
  if "synthetic" not in config:
    return {}
  from v1t_jax import submission
  zip_dir = config.synthetic.zip_dir
  return {meta.name: submission.synthetic_truth(meta, zip_dir) for meta in mice
          if os.path.isfile(os.path.join(
              zip_dir, meta.info["source_name"][: -len(".zip")] + ".truth.npz"))}


def model_figures(predictor, mice=None, *, tier: str = "validation", num_images: int = 4,
                  num_neurons: int = 4,
                  skipped: dict[str, str] | None = None) -> dict[str, Figure]:
  """Rollout, response and readout-position figures of a restored model.

  mice: the dataset's MouseMeta of the predictor's mice in model order (None: no data, only the
  readout positions, uncoloured). skipped: gets {figure name: why not made}.
  """
  model = predictor.model
  figs, colors = {}, None
  if mice is not None:
    tiers = collect_tier(predictor, mice, tier, num_images,
                         synthetic_truth(predictor.config, mice))
    figs.update(tier_figures(tiers, tier, num_neurons, skipped))
    colors = {t.name: t.correlations for t in tiers}
  positions = dict(zip(predictor.mice, readout_positions(model)))
  if colors is not None:   # a mouse without responses in this tier: all grey
    colors = {name: colors.get(name, np.full(len(xy), np.nan)) for name, xy in positions.items()}
  figs["readout_positions"] = plot_readout_positions(
      positions, model.core.output_shape[:2], colors, f"{tier} single-trial correlation")
  return figs


def dataset_mice(predictor, data_dir: str):
  """The converted mice of the predictor's run, in model order; checks they are the same data."""
  from v1t_jax import dataset_meta
  mice = dataset_meta.resolve_mice(data_dir, [r.data_key for r in predictor.records])
  for r, meta in zip(predictor.records, mice):
    if meta.num_neurons != r.neurons:
      raise ValueError(f"{data_dir}: mouse {r.name} has {meta.num_neurons} neurons, the "
                       f"checkpoint {r.neurons}: not the dataset this run was trained on")
  return mice


def summary_images(trainer, state: dict, *, step: int, prefix: str = "figures/",
                   tier: str = "validation", num_images: int = 3,
                   num_neurons: int = 4) -> dict[str, np.ndarray]:
  """TensorBoard images of a training run's state: {prefix + name: uint8 [1, H, W, 3]}.

  For `writer.write_images(step, summary_images(trainer, state, step=step))` (write_summary;
  clu refuses a second write of one tag at one step: give the final figures another prefix).
  The state is copied onto one device (the Predictor runs unsharded) and not modified. Single
  process only: the input pipeline would give each process only its slice of the tier.
  """
  import jax
  from v1t_jax import predict

  device = jax.devices()[0]
  params, buffers = jax.device_put((state["params"], state["buffers"]), device)
  predictor = predict.Predictor(trainer.config, trainer.run_info, params, buffers,
                                device=device, step=step, path="(training)")
  figs = model_figures(predictor, trainer.mice, tier=tier, num_images=num_images,
                       num_neurons=num_neurons)
  return {prefix + name: to_rgb(fig)[None] for name, fig in figs.items()}


def write_summary(writer, trainer, state: dict, step: int, *, prefix: str = "figures/",
                  report=None):
  """The training loop's figures hook (train.train_and_evaluate(figures=...)): summary_images
  written to TensorBoard; skipped on several processes, where the input pipeline gives each
  process only its slice of the validation tier."""
  import contextlib

  import jax
  if jax.process_count() > 1:
    return
  with report.timed("figures") if report is not None else contextlib.nullcontext():
    writer.write_images(step, summary_images(trainer, state, step=step, prefix=prefix))


class Written(list):
  """The PNG paths written (a list), and `skipped`: {PNG path not written: why}."""

  def __init__(self, paths: Sequence[str], skipped: Mapping[str, str]):
    super().__init__(paths)
    self.skipped = dict(skipped)


def _png(out: str, name: str) -> str:
  return os.path.join(out, name.replace("/", "_") + ".png")


def write_figures(workdir: str, *, out: str | None = None, data_dir: str | None = None,
                  tier: str = "validation", which: str = "best", step: int | None = None,
                  num_images: int = 4, num_neurons: int = 4) -> Written:
  """Every figure of a run as PNG files in `out` (default <workdir>/figures).

  Returns the paths written, with `.skipped` {path: reason} of those not made, each also
  reported on one stderr line. An explicit `data_dir` without a converted dataset is an error;
  the config's own data_dir missing only skips the figures that need data.
  """
  from v1t_jax import dataset_meta, predict

  out = out or os.path.join(workdir, "figures")
  predictor = predict.Predictor.from_workdir(workdir, which=which, step=step)
  explicit = bool(data_dir)
  data_dir = data_dir or predictor.config.data.data_dir
  mice, skipped = None, {}
  if data_dir and dataset_meta.available_mice(data_dir):
    mice = dataset_mice(predictor, data_dir)
  elif explicit:
    raise FileNotFoundError(f"--data_dir {data_dir}: no converted dataset there (the rollout "
                            "and response figures need one)")
  else:
    reason = (f"no converted dataset in the run's data_dir {data_dir!r} (pass --data_dir)")
    for name in predictor.mice:
      for kind in ("rollout", "responses"):
        skipped[f"{kind}/{name}"] = reason
  figs = model_figures(predictor, mice, tier=tier, num_images=num_images,
                       num_neurons=num_neurons, skipped=skipped)
  curves = read_scalars(workdir)
  if curves:
    figs["training_curves"] = plot_training_curves(curves, f"Training curves, {workdir}")
  else:
    skipped["training_curves"] = f"no TensorBoard scalars in {workdir}"
  skipped = {_png(out, name): reason for name, reason in skipped.items()}
  for path, reason in skipped.items():
    print(f"figures: skipped {path}: {reason}", file=sys.stderr)
  paths = [save_png(fig, _png(out, name)) for name, fig in figs.items()]
  return Written(paths, skipped)


def main(argv: Sequence[str] | None = None) -> list[str]:
  parser = argparse.ArgumentParser(prog="python -m v1t_jax.figures",
                                   description="PNG figures of a trained v1t_jax run.")
  parser.add_argument("--workdir", required=True, help="run directory of launch_train.py")
  parser.add_argument("--data_dir", default=None,
                      help="converted dataset (default: the run's config.data.data_dir)")
  parser.add_argument("--out", default=None, help="output folder (default: <workdir>/figures)")
  parser.add_argument("--tier", default="validation", choices=("train", "validation", "test"))
  parser.add_argument("--which", default="best", choices=("best", "latest"))
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--num_images", type=int, default=4, help="rollout images per mouse")
  parser.add_argument("--num_neurons", type=int, default=4, help="best neurons per mouse")
  args = parser.parse_args(argv)
  paths = write_figures(args.workdir, out=args.out, data_dir=args.data_dir, tier=args.tier,
                        which=args.which, step=args.step, num_images=args.num_images,
                        num_neurons=args.num_neurons)
  for p in paths:
    print(p)
  if paths.skipped:
    print(f"figures: wrote {len(paths)} PNGs, skipped {len(paths.skipped)} (reasons above)",
          file=sys.stderr)
  return paths


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  try:
    main()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
