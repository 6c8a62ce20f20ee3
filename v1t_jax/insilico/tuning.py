"""Grating tuning: orientation, spatial frequency and phase; OSI and the F1/F0 ratio."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from v1t_jax.insilico.subject import Progress, Subject, check_neurons, evaluate


def gratings(image_hw: tuple[int, int], orientations: np.ndarray, spatial_frequencies: np.ndarray,
             phases: np.ndarray, contrast: float, center=None,
             aperture_sigma: float | None = None) -> np.ndarray:
  """Sinusoidal gratings [O, F, P, h, w]: contrast * cos(2 pi f (x cos o + y sin o) + phase),
  x, y relative to `center` ((x, y), default the image centre); with `aperture_sigma` the
  grating fades into grey under a Gaussian window of that sd (pixels) around `center`."""
  h, w = image_hw
  cx, cy = ((w - 1) / 2, (h - 1) / 2) if center is None else (float(center[0]), float(center[1]))
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  dx, dy = xx - cx, yy - cy
  o = np.asarray(orientations, np.float64)[:, None, None, None, None]
  f = np.asarray(spatial_frequencies, np.float64)[None, :, None, None, None]
  p = np.asarray(phases, np.float64)[None, None, :, None, None]
  g = contrast * np.cos(2 * np.pi * f * (dx * np.cos(o) + dy * np.sin(o)) + p)
  if aperture_sigma:
    g = g * np.exp(-(dx**2 + dy**2) / (2 * aperture_sigma**2))
  return g.astype(np.float32)


def default_spatial_frequencies(n: int = 8) -> np.ndarray:
  """Log-spaced 0.025-0.3 cycles per model pixel (periods 3.3-40 px)."""
  return np.geomspace(0.025, 0.3, n)


def grating_tuning(subject: Subject, neurons: Sequence[int] | None = None, *,
                   orientations: int = 16, spatial_frequencies: Sequence[float] | None = None,
                   phases: int = 8, contrast: float = 1.0, centers: np.ndarray | None = None,
                   aperture_sigma: float = 6.0, batch_size: int = 256,
                   progress: bool = False) -> dict:
  """Responses to gratings over orientation x spatial frequency x phase, and their summary.

  Full field (centers=None): one set of images for all neurons. RF-centred (centers [n, 2] in
  (x, y) model pixels, e.g. the fitted RF centres): each neuron sees gratings in a Gaussian
  aperture of `aperture_sigma` pixels around its centre. Contrast is the amplitude in model-input
  units (clipped to the pixel range).

  Per neuron: `responses` [n, O, F, P], `grey` [n] (response to the grey image),
  `preferred_orientation` (rad, [0, pi): the vector average of the phase-peak response at the
  preferred SF), `preferred_sf` (cycles/pixel, the peak over the grid refined by a parabola in
  log f), `osi` ((R_pref - R_orth) / (R_pref + R_orth), responses above grey), `f1_f0` (first
  harmonic over phase / mean above grey at the preferred grating; > 1: simple, Skottun et al.
  1991) and `is_simple`.
  """
  neurons = check_neurons(subject, neurons)
  if orientations < 2 or orientations % 2 or phases < 3:
    raise ValueError(f"need an even number of orientations >= 2 and >= 3 phases, got "
                     f"{orientations} and {phases}")
  h, w, c = subject.image_hwc
  ori = np.arange(orientations) * np.pi / orientations
  sf = np.asarray(default_spatial_frequencies() if spatial_frequencies is None
                  else spatial_frequencies, np.float64)
  ph = np.arange(phases) * 2 * np.pi / phases
  o_, f_, p_ = len(ori), len(sf), len(ph)

  def images(center=None, sigma=None):
    g = gratings((h, w), ori, sf, ph, contrast, center, sigma).reshape(-1, h, w, 1)
    g = np.broadcast_to(g, (*g.shape[:3], c))
    return np.clip(g, subject.pixel_min, subject.pixel_max).astype(np.float32)

  grey = evaluate(subject, np.zeros((1, h, w, c), np.float32), 1)[0, neurons]
  if centers is None:
    responses = evaluate(subject, images(), batch_size)[:, neurons].T
  else:
    centers = np.asarray(centers, np.float64)
    if centers.shape != (len(neurons), 2):
      raise ValueError(f"centers must be [n, 2] = [{len(neurons)}, 2], got {list(centers.shape)}")
    responses = np.empty((len(neurons), o_ * f_ * p_), np.float32)
    report = Progress("RF-centred gratings", len(neurons), progress)
    for i, (neuron, centre) in enumerate(zip(neurons, centers)):
      responses[i] = evaluate(subject, images(centre, aperture_sigma), batch_size)[:, neuron]
      report(i + 1)
  responses = responses.reshape(len(neurons), o_, f_, p_)
  return {"responses": responses, "grey": grey, "orientations": ori, "spatial_frequencies": sf,
          "phases": ph, "neurons": neurons, **tuning_summary(responses, grey, ori, sf, ph)}


def tuning_summary(responses_NxOxFxP: np.ndarray, grey_N: np.ndarray, ori: np.ndarray,
                   sf: np.ndarray, ph: np.ndarray) -> dict:
  """Preferred orientation and SF, OSI and F1/F0 of `grating_tuning`'s responses."""
  r = np.asarray(responses_NxOxFxP, np.float64)
  n, o_, f_, p_ = r.shape
  above = r - np.asarray(grey_N, np.float64)[:, None, None, None]
  peak = above.max(axis=3)                                   # [n, O, F], phase-peak response
  f0 = above.mean(axis=3)
  f1 = 2.0 * np.abs((r * np.exp(-1j * np.asarray(ph))).sum(axis=3)) / p_
  best = peak.reshape(n, -1).argmax(axis=1)
  o_i, f_i = np.unravel_index(best, (o_, f_))
  rows = np.arange(n)
  # SF: parabola through log f at the peak and its neighbours.
  logf = np.log(sf)
  curve = peak[rows, o_i]                                    # [n, F] at the preferred orientation
  pref_sf = np.exp(logf[f_i])
  inner = (f_i > 0) & (f_i < f_ - 1)
  if inner.any():
    i = f_i[inner]
    ym, y0, yp = curve[inner, i - 1], curve[inner, i], curve[inner, i + 1]
    denom = ym - 2 * y0 + yp
    step = np.where(np.abs(denom) > 1e-12, 0.5 * (ym - yp) / np.where(denom == 0, 1, denom), 0)
    spacing = (logf[-1] - logf[0]) / (f_ - 1)
    pref_sf[inner] = np.exp(logf[i] + np.clip(step, -0.5, 0.5) * spacing)
  # Orientation: vector average of the (baseline-free) tuning curve at the preferred SF.
  tune = peak[rows, :, f_i]                                  # [n, O]
  tune = np.maximum(tune - tune.min(axis=1, keepdims=True), 0.0)
  vec = (tune * np.exp(2j * ori)[None]).sum(axis=1)
  pref_ori = np.mod(np.angle(vec) / 2, np.pi)
  pos = np.maximum(peak[rows, :, f_i], 0.0)
  r_pref, r_orth = pos[rows, o_i], pos[rows, (o_i + o_ // 2) % o_]
  osi = (r_pref - r_orth) / np.maximum(r_pref + r_orth, 1e-12)
  f0_best, f1_best = f0[rows, o_i, f_i], f1[rows, o_i, f_i]
  ratio = np.where(f0_best > 1e-12, f1_best / np.maximum(f0_best, 1e-12), np.inf)
  return {"preferred_orientation": pref_ori, "preferred_sf": pref_sf, "osi": osi,
          "f0": f0_best, "f1": f1_best, "f1_f0": ratio, "is_simple": f1_best > f0_best,
          "circular_variance": 1.0 - np.abs(vec) / np.maximum(tune.sum(axis=1), 1e-12)}
