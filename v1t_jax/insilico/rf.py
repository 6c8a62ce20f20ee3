"""Artificial receptive fields: white-noise STA (the V1T paper's aRFs), the second-order map,
the gradient at grey, and 2D Gaussian fits of all of them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from v1t_jax.insilico.subject import Progress, Subject, blur_matrix, check_neurons, evaluate


def white_noise(rng: np.random.Generator, shape) -> np.ndarray:
  """Uniform white noise standardised to mean 0, variance 1 (V1T's misc/estimate_aRFs.py draws
  U(0, 1) and standardises it)."""
  return ((rng.random(shape, dtype=np.float32) - 0.5) * np.float32(math.sqrt(12.0)))


def receptive_fields(subject: Subject, neurons: Sequence[int] | None = None, *,
                     n_noise: int = 20000, batch_size: int = 500, seed: int = 0,
                     noise_scale: float = 1.0, gradient: bool = True, fit: bool = True,
                     progress: bool = False) -> dict:
  """Artificial receptive fields ([n, h, w, c] maps) with 2D Gaussian fits.

  - "sta": white-noise spike-triggered average, the V1T paper's aRF: the response-weighted mean
    of `n_noise` uniform white-noise images (unit variance times `noise_scale`). We subtract the
    mean response first (the original sums raw responses: the same map plus a noise term);
  - "sta2": the second-order map, the response-weighted mean of (noise^2 - E noise^2): it
    localises cells whose STA vanishes (complex cells respond to energy, not sign);
  - "combined": sqrt(z_sta^2 + z_sta2^2), each in units of its background noise: the map whose
    fit gives the RF centre of simple and complex cells alike (`rf_centers`);
  - "grad": the gradient of the response at the grey image (JAX subjects, `gradient=True`).

  fits[map] is [n, 8]: amplitude, x0, y0, sigma_x, sigma_y, theta, offset, R^2 (see
  `fit_gaussian_2d`); `center[map]` [n, 2] = (x0, y0).
  """
  neurons = check_neurons(subject, neurons)
  h, w, c = subject.image_hwc
  rng = np.random.default_rng(seed)
  sum_rx = np.zeros((len(neurons), h * w * c), np.float64)
  sum_rx2 = np.zeros_like(sum_rx)
  sum_x = np.zeros(h * w * c, np.float64)
  sum_x2 = np.zeros(h * w * c, np.float64)
  sum_r = np.zeros(len(neurons), np.float64)
  report = Progress("white noise", n_noise, progress)
  done = 0
  while done < n_noise:
    b = min(batch_size, n_noise - done)
    x = white_noise(rng, (b, h, w, c)) * np.float32(noise_scale)
    r = evaluate(subject, x, batch_size)[:, neurons]
    flat = x.reshape(b, -1)
    sum_rx += r.T @ flat
    sum_rx2 += r.T @ (flat * flat)
    sum_x += flat.sum(0)
    sum_x2 += (flat * flat).sum(0)
    sum_r += r.sum(0)
    done += b
    report(done)
  mean_r = sum_r / n_noise
  sta = (sum_rx - mean_r[:, None] * sum_x[None]) / n_noise
  sta2 = (sum_rx2 - mean_r[:, None] * sum_x2[None]) / n_noise
  maps = {"sta": sta.reshape(-1, h, w, c).astype(np.float32),
          "sta2": sta2.reshape(-1, h, w, c).astype(np.float32)}
  maps["combined"] = combined_map(maps["sta"], maps["sta2"])
  if gradient and subject.differentiable:
    maps["grad"] = gradient_at(subject, np.zeros((h, w, c), np.float32), neurons, batch_size)
  result = {"maps": maps, "neurons": neurons, "n_noise": n_noise}
  if fit:
    result["fits"] = {k: fit_gaussian_2d(v) for k, v in maps.items()}
    result["center"] = {k: f[:, 1:3] for k, f in result["fits"].items()}
  return result


def robust_z(maps_NxHxWxC: np.ndarray) -> np.ndarray:
  """Each map in units of its background noise (median and 1.4826 MAD over pixels)."""
  m = np.asarray(maps_NxHxWxC, np.float64)
  med = np.median(m, axis=(1, 2, 3), keepdims=True)
  mad = 1.4826 * np.median(np.abs(m - med), axis=(1, 2, 3), keepdims=True)
  return (m - med) / np.maximum(mad, 1e-30)


def combined_map(sta: np.ndarray, sta2: np.ndarray) -> np.ndarray:
  """sqrt(z_sta^2 + z_sta2^2) with robust z-scores: one map that localises simple cells (by
  their STA) and complex cells (by their second-order map) without choosing between them."""
  return np.sqrt(robust_z(sta) ** 2 + robust_z(sta2) ** 2).astype(np.float32)


def rf_centers(rf: dict) -> np.ndarray:
  """RF centres [n, 2] (x, y) of `receptive_fields`' result: the Gaussian fit of the "combined"
  map, which localises simple cells by their STA and complex cells by their second-order map."""
  return rf["fits"]["combined"][:, 1:3]


def gradient_at(subject: Subject, image_HxWxC: np.ndarray, neurons: Sequence[int],
                batch_size: int = 256) -> np.ndarray:
  """d response_n / d image at one image, for each neuron: [n, h, w, c]."""
  neurons = check_neurons(subject, neurons)

  @jax.jit
  def grads(x_BxHxWxC, target_B):
    def total(x):
      r = subject.respond(x)
      return jnp.sum(jnp.take_along_axis(r, target_B[:, None], axis=1))
    return jax.grad(total)(x_BxHxWxC)

  out = []
  for start in range(0, len(neurons), batch_size):
    idx = neurons[start:start + batch_size]
    pad = batch_size - len(idx) if len(neurons) > batch_size else 0
    target = np.concatenate([idx, np.zeros(pad, np.int64)])
    x = np.broadcast_to(image_HxWxC, (len(target), *image_HxWxC.shape))
    out.append(np.asarray(grads(jnp.asarray(x), jnp.asarray(target)))[: len(idx)])
  return np.concatenate(out)


def gaussian_2d(xy, amplitude, x0, y0, sigma_x, sigma_y, theta, offset):
  """Rotated 2D Gaussian (V1T's misc/estimate_aRFs.py parametrisation), flattened."""
  x, y = xy
  ct, st = np.cos(theta), np.sin(theta)
  a = ct**2 / (2 * sigma_x**2) + st**2 / (2 * sigma_y**2)
  b = -np.sin(2 * theta) / (4 * sigma_x**2) + np.sin(2 * theta) / (4 * sigma_y**2)
  cc = st**2 / (2 * sigma_x**2) + ct**2 / (2 * sigma_y**2)
  dx, dy = x - x0, y - y0
  return (offset + amplitude * np.exp(-(a * dx**2 + 2 * b * dx * dy + cc * dy**2))).ravel()


def _gaussian_jnp(p, x, y):
  """gaussian_2d with p = (amplitude, x0, y0, log sigma_x, log sigma_y, theta, offset)."""
  amplitude, x0, y0, log_sx, log_sy, theta, offset = p
  ct, st = jnp.cos(theta), jnp.sin(theta)
  dx, dy = x - x0, y - y0
  u, v = ct * dx - st * dy, st * dx + ct * dy      # the ellipse's axes (gaussian_2d's theta)
  return offset + amplitude * jnp.exp(-0.5 * ((u / jnp.exp(log_sx)) ** 2
                                              + (v / jnp.exp(log_sy)) ** 2))


@jax.jit
def _levenberg_marquardt(p0_Nx7, data_NxP, x_P, y_P):
  """Least-squares Gaussian fits, all maps at once (vmapped Levenberg-Marquardt, 100 steps)."""
  def fit(p0, data):
    def residual(p):
      return _gaussian_jnp(p, x_P, y_P) - data

    def step(_, state):
      p, lam, cost = state
      r, jac = residual(p), jax.jacfwd(residual)(p)
      jtj = jac.T @ jac
      delta = jnp.linalg.solve(jtj + lam * (jnp.diag(jnp.diag(jtj)) + 1e-9 * jnp.eye(7)),
                               -jac.T @ r)
      new = p + delta
      new_cost = jnp.sum(residual(new) ** 2)
      better = new_cost < cost
      return (jnp.where(better, new, p), jnp.where(better, lam / 3, lam * 3),
              jnp.where(better, new_cost, cost))

    p, _, cost = jax.lax.fori_loop(0, 100, step, (p0, 1e-2, jnp.sum(residual(p0) ** 2)))
    return p, cost
  return jax.vmap(fit)(p0_Nx7, data_NxP)


def fit_gaussian_2d(maps_NxHxWxC: np.ndarray) -> np.ndarray:
  """Fit `gaussian_2d` to each map's |standardised| values (channels averaged), as V1T's
  aRF fit; returns [n, 8] = 7 parameters + R^2 (NaN where the fit failed).

  All maps are fitted at once by a vmapped Levenberg-Marquardt in JAX (the original: scipy's
  curve_fit one neuron at a time). Also where we differ: maps are centred on their median (the
  background), not their mean, so |.| of a one-signed blob stays a Gaussian; fits start at the
  peak of the smoothed map with sigma 3 (the original: the image centre, sigma 10); no noise is
  added to the data; a centre outside the image or a sigma outside 0.3-max(h, w) is a failed
  fit. Reported with sigma_x >= sigma_y, theta in [0, pi).
  """
  maps = np.asarray(maps_NxHxWxC, np.float64)
  n, h, w, _ = maps.shape
  # A flat map (e.g. the gradient of a complex cell at grey) has no receptive field to fit.
  flat = maps.std(axis=(1, 2, 3)) <= 1e-6 * (np.abs(maps).max(axis=(1, 2, 3)) + 1e-30)
  z = (maps - np.median(maps, axis=(1, 2, 3), keepdims=True)) / (
      maps.std(axis=(1, 2, 3), keepdims=True) + 1e-12)
  z = np.abs(z).mean(axis=-1)
  smooth = np.einsum("yh,nhw,xw->nyx", blur_matrix(h, 1.5), z, blur_matrix(w, 1.5))
  y0, x0 = np.unravel_index(smooth.reshape(n, -1).argmax(axis=1), (h, w))
  data = z.reshape(n, -1)
  background = np.median(data, axis=1)
  p0 = np.stack([np.maximum(data.max(axis=1) - background, 1e-3), x0, y0,
                 np.full(n, np.log(3.0)), np.full(n, np.log(3.0)), np.zeros(n), background], 1)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  p, cost = _levenberg_marquardt(jnp.asarray(p0, jnp.float32), jnp.asarray(data, jnp.float32),
                                 jnp.asarray(xx.ravel()), jnp.asarray(yy.ravel()))
  p, cost = np.asarray(p, np.float64), np.asarray(cost, np.float64)
  with np.errstate(over="ignore"):   # a diverged fit: inf sigma, rejected below
    sx, sy = np.exp(p[:, 3]), np.exp(p[:, 4])
  swap = sy > sx   # the same ellipse with the axes swapped
  theta = np.mod(p[:, 5] + swap * np.pi / 2, np.pi)
  sx, sy = np.maximum(sx, sy), np.minimum(sx, sy)
  r2 = 1.0 - cost / np.maximum(((data - data.mean(1, keepdims=True)) ** 2).sum(1), 1e-12)
  ok = (~flat & np.all(np.isfinite(p), axis=1) & (p[:, 0] > 0) & (p[:, 1] >= -0.5)
        & (p[:, 1] <= w - 0.5) & (p[:, 2] >= -0.5) & (p[:, 2] <= h - 0.5) & (sy >= 0.3)
        & (sx <= max(h, w)))
  out = np.stack([p[:, 0], p[:, 1], p[:, 2], sx, sy, theta, p[:, 6], r2], axis=1)
  out[~ok] = np.nan
  return out

