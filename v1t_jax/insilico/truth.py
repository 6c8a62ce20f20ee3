"""How well in-silico experiments recover the ground truth of a synthetic mouse.

The synthetic zips' truth files (`<zip stem>.truth.npz`, written by data_prep.synthesize beside
each zip) hold every parameter of the simulated population (`population/<field>`): RF centre
(model pixels), orientation, spatial frequency, phase, simple/complex, envelope and eye-shift
parameters. `recovery` compares a model's RF centres, preferred orientations and SFs and
simple/complex calls with them, over the neurons whose test correlation is in the top half.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
import zipfile

import numpy as np

from data_prep import simulate
from v1t_jax.insilico.rf import rf_centers
from v1t_jax.insilico.subject import Subject


def find_truth_file(data_key: str, zip_dir: str) -> tuple[str, str]:
  """(truth .npz, zip) of the synthetic mouse `data_key` in zip_dir."""
  if not os.path.isdir(zip_dir):
    raise FileNotFoundError(f"{zip_dir}: no such folder of synthetic zips (--truth_zips)")
  hits = sorted(glob.glob(os.path.join(glob.escape(zip_dir), f"static{data_key}-*.truth.npz")))
  if not hits:
    raise FileNotFoundError(f"{zip_dir}: no ground truth for mouse {data_key} (expected "
                            f"static{data_key}-*.truth.npz written by data_prep.synthesize)")
  truth = hits[0]
  zip_path = truth[: -len(".truth.npz")] + ".zip"
  if not os.path.isfile(zip_path):
    raise FileNotFoundError(f"{zip_path}: the zip of {truth} is missing")
  return truth, zip_path


def load_population(truth_path: str) -> simulate.Population:
  """The simulated population recorded in a truth file."""
  with np.load(truth_path) as z:
    fields = {f.name: z[f"population/{f.name}"] for f in dataclasses.fields(simulate.Population)
              if f"population/{f.name}" in z}
  missing = {f.name for f in dataclasses.fields(simulate.Population)} - set(fields)
  if missing:
    raise ValueError(f"{truth_path}: no population parameters {sorted(missing)} (written by an "
                     "older data_prep.synthesize; synthesize the mice again)")
  return simulate.Population(**fields)


def reference_behavior(record) -> tuple[np.ndarray, np.ndarray]:
  """Raw behaviour [3] and pupil centre [2] for a mouse: its recorded means, or the simulator's
  reference values for a stimulus-only mouse (whose files hold zeros)."""
  behavior = record.behavior_mean if record.has_behavior else np.array(
      [simulate.PUPIL_REF, 0.0, 0.0], np.float32)
  pupil = record.pupil_center_mean if record.has_pupil_center else np.asarray(
      simulate.EYE_REF, np.float32)
  return np.asarray(behavior, np.float32), np.asarray(pupil, np.float32)


def truth_subject(population: simulate.Population, record, image_hwc, behavior,
                  pupil_center) -> Subject:
  """The simulator's noise-free rates as a Subject on the run's model inputs (NumPy, no grads).

  Model inputs are the mouse's z-scored images on the 36 x 64 model grid, so raw grey levels
  are x * std + mean: the simulator sees the same picture as the trained model.
  """
  h, w, c = image_hwc
  if (h, w) != simulate.MODEL_GRID:
    raise ValueError(f"the ground truth lives on the {simulate.MODEL_GRID} model grid; this run's "
                     f"model input is {h}x{w} (center_crop or image_size changed)")
  channels = population.channel_weights.shape[1]
  mean = np.asarray(record.image_mean, np.float32).reshape(-1)
  std = np.asarray(record.image_std, np.float32).reshape(-1)
  b = np.asarray(behavior, np.float32).reshape(1, 3)
  p = np.asarray(pupil_center, np.float32).reshape(1, 2)

  def respond(x_BxHxWxC):
    x = np.asarray(x_BxHxWxC, np.float32)
    if x.shape[-1] != channels:   # gray_scale model input: every raw channel the same
      x = np.repeat(x.mean(axis=-1, keepdims=True), channels, axis=-1)
    raw = x * std + mean
    n = len(raw)
    return population.rates(raw.transpose(0, 3, 1, 2), np.repeat(b, n, 0), np.repeat(p, n, 0))

  lo, hi = (0.0 - mean) / std, (255.0 - mean) / std
  if lo.size != c:
    lo, hi = np.full(c, lo.mean()), np.full(c, hi.mean())
  return Subject(respond, tuple(image_hwc), population.n_neurons, lo.astype(np.float32),
                 hi.astype(np.float32), differentiable=False, name="ground truth")


def true_properties(population: simulate.Population, pupil_center) -> dict:
  """What the experiments should find, in model pixels at the given (raw) pupil centre.

  The simulator samples the image at u + d(pupil) (`Population.drive`), so a filter centred at
  c responds to the image around c + d.
  """
  shift = population.eye_shift(np.asarray(pupil_center, np.float64).reshape(1, 2))[0]
  return {"center": population.rf_center.astype(np.float64) + shift,
          "orientation": np.mod(population.orientation.astype(np.float64), np.pi),
          "spatial_frequency": population.spatial_frequency.astype(np.float64),
          "is_simple": ~population.is_complex.astype(bool), "eye_shift": shift}


def read_tier(zip_path: str, truth_path: str, tier: str = "test") -> dict:
  """Raw images, behaviour, pupil centre and responses of one tier from a synthetic zip; where
  the responses are withheld (competition mice) the noise-free rates stand in."""
  with np.load(truth_path) as z:
    tiers, withheld, rates = z["tiers"], z["withheld"], z["rates"]
  trials = np.flatnonzero(tiers == tier)
  if not trials.size:
    raise ValueError(f"{zip_path}: no {tier} trials")
  stem = os.path.basename(zip_path)[: -len(".zip")]
  with zipfile.ZipFile(zip_path) as zf:
    def load(field):
      return np.stack([np.load(io.BytesIO(zf.read(f"{stem}/data/{field}/{i}.npy")))
                       for i in trials])
    out = {f: load(f) for f in ("images", "behavior", "pupil_center", "responses")}
  if withheld[trials].any():
    out["responses"] = rates[trials]
  out["trials"] = trials
  return out


def orientation_error_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """|a - b| modulo 180 degrees, in [0, 90]."""
  d = np.mod(np.asarray(a) - np.asarray(b) + np.pi / 2, np.pi) - np.pi / 2
  return np.degrees(np.abs(d))


def recovery(rf: dict, tuning: dict, truth: dict, selected: np.ndarray) -> dict:
  """Medians over `selected` (neuron indices) of how far the estimates are from the truth."""
  neurons = np.asarray(rf["neurons"])
  if not np.array_equal(neurons, np.asarray(tuning["neurons"])):
    raise ValueError("rf and tuning were run on different neurons")
  pos = {int(n): i for i, n in enumerate(neurons)}
  rows = np.array([pos[int(n)] for n in selected if int(n) in pos])
  if not rows.size:
    raise ValueError("none of the selected neurons was measured")
  ids = neurons[rows]
  centers = rf_centers(rf)
  center_err = np.linalg.norm(centers[rows] - truth["center"][ids], axis=1)
  ori_err = orientation_error_deg(tuning["preferred_orientation"][rows], truth["orientation"][ids])
  sf_ratio = tuning["preferred_sf"][rows] / truth["spatial_frequency"][ids]
  agree = tuning["is_simple"][rows] == truth["is_simple"][ids]
  # A neuron whose RF could not be fitted counts as missed (infinite error), not as absent.
  return {"rf_center_error_px": float(np.median(np.nan_to_num(center_err, nan=np.inf))),
          "orientation_error_deg": float(np.median(ori_err)),
          "sf_ratio": float(np.median(sf_ratio)),
          "simple_complex_accuracy": float(np.mean(agree)),
          "neurons": int(rows.size),
          "per_neuron": {"neuron": ids, "rf_center_error_px": center_err,
                         "orientation_error_deg": ori_err, "sf_ratio": sf_ratio,
                         "simple_complex_agree": agree}}
