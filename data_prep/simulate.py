"""Ground-truth simulator of a mouse V1 population for the synthetic Sensorium datasets.

Everything here is plain numpy. The dataset writer calls four things: :func:`render_images`,
:func:`sample_behavior`, :func:`make_population` (one per mouse) and the two methods of the
returned :class:`Population`; :func:`oracle_correlation` is the Sensorium single-trial metric.

Images
------
Each image is rendered from its own generator ``np.random.default_rng([seed, image_id])``, so an
id always gives the same picture whatever batch it is rendered in. On a canvas of 144 x 256 pixels
(the grey Sensorium size; colour images are rendered at 4x and block-averaged to 36 x 64):

* background: 1/f^a amplitude-spectrum (pink) noise, a ~ U(0.9, 1.3), plus a linear luminance
  gradient;
* 2-9 occluding shapes painted back to front with a one-pixel soft edge: ellipses, convex
  polygons (intersections of half-planes) and large half-plane occluders ("horizons"). Each shape
  has its own grey level, a gradient and a texture of its own contrast (a randomly shifted,
  flipped copy of the background noise);
* the canvas is standardised, then mapped to grey level m + s * canvas with a per-image mean
  m ~ N(113, 16) and contrast s ~ N(67, 10), clipped to [0, 255] and rounded to integers, so a
  lossless uint8 cast exists. Over many images the grey levels have mean ~113 and std ~65 (the
  Sensorium statistics 113.5 / 64.6) and the power spectrum falls roughly as 1/f^2.

Colour (C = 2, channel 0 = UV, 1 = green): luminance L as above plus a smooth pink chroma field
K (and a per-shape chroma offset); green = L + 0.4 K, UV = L - 0.4 K + a sky term brighter in
the upper part of the image, each channel standardised and mapped to its grey levels separately.
The channels are strongly correlated (r ~ 0.8) but not identical.

Behaviour (one arousal latent per trial)
----------------------------------------
a ~ N(0, 1) per trial. The mouse runs with probability sigmoid(2 a - 0.5), at a speed
~ LogNormal(log 12 + 0.3 a, 0.5) cm/s, else |N(0, 0.3)| (encoder jitter). Pupil size
= 22 exp(0.2 a + 0.1 e + 0.1 running) camera pixels (> 0); its derivative = 0.3 a + 0.4 e'.
Pupil centre = (200, 195) + (10 e_x + 3 a, 7 e_y - 2 a), clipped to [150, 250].
Returned as behavior = [pupil size, d pupil / dt, running speed] and pupil_center = [x, y].

Population (one mouse)
----------------------
* Cortical positions: x, y uniform in a square window of side 600-900 um; z on 3 planes
  (100-340 um).
* Retinotopy: the receptive-field (RF) centre c_i, in pixels of the 36 x 64 "model grid" (the
  image block-averaged 4x for grey; x = column, y = row, row 0 at the top, pixel centres at
  integers, so a grey-image pixel column is 4 x + 1.5), is a smooth function
  of cortical position: u = cortical (x, y) scaled to [-1/2, 1/2]; c = c0 + R(theta) A u +
  k * (u_y^2, u_x^2) + N(0, 1.2^2) scatter, with A = diag(22-28, +-(16-22)) px per window
  (elevation axis possibly mirrored), |theta| < 0.35 rad, |k| < 4 px a mild curvature, c0 near
  the screen centre. Clipped to the image.
* Filters: Gabor functions on the model grid, orientation U(0, pi), spatial frequency
  f ~ LogNormal(log 0.1, 0.35) clipped to [0.04, 0.25] cycles/px, phase U(0, 2 pi),
  envelope sigma = n_cyc / f with n_cyc ~ U(0.3, 0.55) (clipped to 1.2-5 px), aspect U(0.55, 1).
  The envelope-weighted mean is removed (no DC response), the filter has unit norm. For colour,
  the filter is applied to UV with weight w and to green with weight 1 - w, with
  w = sigmoid(6 (1/2 - c_y / 36) + N(0, 0.5^2)) (more UV in the upper visual field); 5% of the
  neurons are colour-opponent (green weight negated).
* Stimulus drive: the image is block-averaged to 36 x 64, standardised with the Sensorium
  constants (x - 113.5) / 64.6 and shifted by the eye-position displacement d (below).
  Simple cells (40%): g = <G_even, x>; complex cells (60%): energy model
  g = sqrt(<G_even, x>^2 + <G_odd, x>^2) (quadrature pair). z = (g - mu_i) / sd_i, where mu_i and
  sd_i are the mean and std of g over a calibration batch (so z is in standard units).
* Output: rate = A_i * exp(b_run f_run + b_pup f_pup + b_dpup f_dpup) * softplus(k_i (z - t_i))
  with A_i ~ LogNormal(0, 0.5), slope k_i ~ U(1, 2.5), threshold t_i ~ U(0, 1.2), and the
  behaviour features f_run = 1 - exp(-speed / 5), f_pup = tanh((pupil - 22) / 5),
  f_dpup = tanh(d pupil / 0.5). Gains b_run ~ N(0.4, 0.3^2), b_pup ~ N(0.25, 0.2^2),
  b_dpup ~ N(0.05, 0.05^2): mostly positive, i.e. running and dilation scale responses up.
* Eye position: the RF of every neuron is displaced by d(p) = S tanh(M (p - p0) / S), with p the
  pupil centre, p0 = (200, 195), M a 2 x 2 matrix of ~0.15-0.3 model pixels per camera pixel
  (small off-diagonal terms), S = 6 px. Implemented by shifting the image by -d (band-limited
  Fourier shift of the zero-padded image, so grey outside the screen), which is the same thing.
* Behaviour and pupil must be the real per-trial values: for the SENSORIUM mouse, whose files
  hold zeroed behaviour, compute the rates from the sampled values and zero them only on disk.
* Noise (sample_responses), per trial t and neuron i: a gain shared by all neurons
  m_t = exp(c_i e_t - c_i^2 / 2), e_t ~ N(0, 1), c_i ~ U(0.05, 0.25); a private gain
  p_ti ~ Gamma(1 / w_i, w_i) (mean 1, variance w_i); then a compound Poisson-gamma process
  ("events" of random amplitude, like deconvolved calcium activity): N ~ Poisson(r m p / q_i),
  response = sum of N amplitudes ~ Gamma(alpha_i, q_i / alpha_i), alpha_i ~ U(1, 3). Given
  r m p the response has mean r m p and variance F_i r m p, F_i = q_i (1 + 1 / alpha_i).
  Trials with no event get a tiny positive value U(1e-9, 1e-8) instead of 0 (~70% of entries).

Calibration (make_population / calibrate)
-----------------------------------------
A calibration batch of 600 natural-like images (its own image seed) with sampled behaviour is
rendered. (1) mu_i, sd_i are set from the raw drives g. (2) With the noise-free rates r of that
batch, the response y satisfies E[y | r] = r and
var(y) = var(r) + B_i, B_i = E[r^2] ((1 + v_i)(1 + w_i) - 1) + F_i E[r], v_i = exp(c_i^2) - 1,
so corr(r, y)^2 = var(r) / (var(r) + B_i). Each neuron draws a target reliability
rho_i ~ Beta(8.5, 7.9) (mean 0.52, sd 0.12, clipped to [0.15, 0.85]), hence a noise budget
B_i = var(r) (1 / rho_i^2 - 1). The private gain takes a share phi_i ~ U(0.4, 0.8) of it (solved
for w_i), the event process the rest (solved for F_i, hence q_i; floored at a small positive
value). The oracle single-trial correlation on fresh images and behaviour is therefore ~0.52
(measured 0.51-0.53 for grey and colour mice), with neurons differing in reliability.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import numpy as np

# Sensorium image statistics (V1T constants) used to standardise images inside the model.
IMAGE_MEAN = 113.5
IMAGE_STD = 64.6
# Resolution the neurons "see" (and the baselines are trained at).
MODEL_GRID = (36, 64)
# Nominal behaviour centre (sample_behavior's medians), used as reference by the gain model.
PUPIL_REF = 22.0
PUPIL_SCALE = 5.0
DPUPIL_SCALE = 0.5
RUN_SCALE = 5.0
EYE_REF = (200.0, 195.0)
EYE_SHIFT_MAX = 6.0
N_CALIBRATION = 600
TINY = (1e-9, 1e-8)


# --------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=8)
def _canvas_grids(h: int, w: int):
    """Pixel grids (float32) and log spatial frequency of the rfft2 bins of an (h, w) canvas."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    f[0, 0] = 1.0
    return yy, xx, np.log(f)


def _pink_noise(rng: np.random.Generator, h: int, w: int, exponent: float) -> np.ndarray:
    """Zero-mean, unit-std noise with amplitude spectrum 1/f^exponent on an (h, w) canvas."""
    log_f = _canvas_grids(h, w)[2]
    amp = np.exp(-exponent * log_f)
    amp[0, 0] = 0.0
    coef = rng.standard_normal((2, h, w // 2 + 1), dtype=np.float32)
    spec = (coef[0] + np.complex64(1j) * coef[1]) * amp.astype(np.float32)
    out = np.fft.irfft2(spec, s=(h, w)).astype(np.float32, copy=False)
    return out / out.std()


def _shape_distance(rng: np.random.Generator, h: int, w: int):
    """A random ellipse, convex polygon or half-plane on an (h, w) canvas.

    Returns (window, distance): the (row slice, column slice) outside which the shape is surely
    absent, and the signed distance in pixels (< 0 inside) on that window.
    """
    kind = rng.choice(3, p=[0.45, 0.4, 0.15])
    cy, cx = float(rng.uniform(-0.1, 1.1) * h), float(rng.uniform(-0.1, 1.1) * w)
    reach = math.inf  # radius around (cy, cx) that contains the shape
    if kind == 0:  # ellipse
        ry, rx = (float(r) for r in rng.uniform(0.05, 0.4, size=2) * h)
        t = float(rng.uniform(0, np.pi))
        reach = max(rx, ry)
    elif kind == 1:  # convex polygon: intersection of half-planes around (cy, cx)
        k = int(rng.integers(3, 7))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=k)) + rng.uniform(0, 2 * np.pi)
        radii = rng.uniform(0.06, 0.35, size=k) * h * rng.uniform(0.7, 2.0)
        gap = np.diff(np.append(angles, angles[0] + 2 * np.pi)).max()
        if gap < 0.9 * np.pi:  # bounded: every point is within r_max / cos(gap / 2)
            reach = radii.max() / math.cos(gap / 2)
    else:  # half-plane occluder ("horizon", large object edge)
        a = float(rng.uniform(0, 2 * np.pi))
    window = (
        slice(max(0, int(cy - reach) - 2), max(0, min(h, int(math.ceil(cy + reach)) + 2))),
        slice(max(0, int(cx - reach) - 2), max(0, min(w, int(math.ceil(cx + reach)) + 2))),
    ) if math.isfinite(reach) else (slice(0, h), slice(0, w))
    yy, xx, _ = _canvas_grids(h, w)
    dy, dx = yy[window] - cy, xx[window] - cx
    if kind == 0:
        u = dx * math.cos(t) + dy * math.sin(t)
        v = dy * math.cos(t) - dx * math.sin(t)
        return window, (np.sqrt((u / rx) ** 2 + (v / ry) ** 2) - 1.0) * min(rx, ry)
    if kind == 1:
        dist = None
        for a, r in zip(angles.tolist(), radii.tolist()):
            d = dx * math.cos(a) + dy * math.sin(a) - r
            dist = d if dist is None else np.maximum(dist, d, out=dist)
        return window, dist
    return window, dx * math.cos(a) + dy * math.sin(a)


def _render_canvas(rng: np.random.Generator, h: int, w: int, colour: bool):
    """Standardised luminance canvas (h, w), and a chroma canvas if colour."""
    yy, xx, _ = _canvas_grids(h, w)
    yn, xn = yy / h - 0.5, xx / w - 0.5

    def gradient(scale, window):
        gy, gx = rng.normal(0, scale, size=2)
        return np.float32(gy) * yn[window] + np.float32(gx) * xn[window]

    full = (slice(0, h), slice(0, w))
    noise = _pink_noise(rng, h, w, rng.uniform(0.9, 1.3))
    lum = 0.8 * noise + gradient(1.0, full)
    texture = np.tile(noise[::-1, ::-1], (2, 2))  # shapes' texture: flipped, shifted background
    chroma = 0.7 * _pink_noise(rng, h, w, 1.5) if colour else None
    for _ in range(int(rng.integers(2, 10))):
        window, dist = _shape_distance(rng, h, w)
        alpha = np.clip(0.5 - dist, 0.0, 1.0)
        oy, ox = (int(o) for o in rng.integers(0, [h, w]))
        ys, xs = window
        tex = texture[oy + ys.start : oy + ys.stop, ox + xs.start : ox + xs.stop]
        fill = rng.normal(0, 1.2) + gradient(0.7, window) + rng.uniform(0.1, 0.8) * tex
        lum[window] += alpha * (fill - lum[window])
        if colour:
            chroma[window] += alpha * (rng.normal(0, 0.6) - chroma[window])
    lum = (lum - lum.mean()) / lum.std()
    return lum, chroma, yn


def _to_grey_levels(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Standardised canvas -> grey levels with a per-image mean and contrast."""
    mean = np.clip(rng.normal(113.0, 16.0), 60.0, 170.0)
    contrast = np.clip(rng.normal(67.0, 10.0), 35.0, 95.0)
    c = (canvas - canvas.mean()) / (canvas.std() + 1e-12)
    return mean + contrast * c


def _render_one(seed: int, image_id: int, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    rng = np.random.default_rng([int(seed), int(image_id)])
    factor = max(1, int(round(144 / h)))  # colour 36x64 images: render at 144x256, average 4x4
    lum, chroma, yn = _render_canvas(rng, h * factor, w * factor, colour=c > 1)
    if c == 1:
        canvases = lum[None]
    else:
        sky = rng.uniform(0.3, 1.0) * np.clip(-2.0 * yn, 0.0, None)  # brighter in the upper half
        uv, green = lum - 0.4 * chroma + sky, lum + 0.4 * chroma
        canvases = np.stack([uv, green] + [green] * (c - 2))
    if factor > 1:
        canvases = canvases.reshape(c, h, factor, w, factor).mean(axis=(2, 4))
    img = np.stack([_to_grey_levels(rng, canvas) for canvas in canvases])
    return np.rint(np.clip(img, 0.0, 255.0)).astype(np.float32)


def render_images(seed: int, image_ids: np.ndarray, shape: tuple[int, int, int],
                  rendered: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
    """Natural-like images (T, C, H, W) float32 holding integer grey levels in [0, 255].

    Deterministic per (seed, image_id). shape is (1, 144, 256) for grey or (2, 36, 64) for colour
    (channel 0 UV, channel 1 green). Each distinct id is rendered once; ids in `rendered`
    (earlier output of this function for the same seed and shape) are taken from it.
    """
    ids = np.asarray(image_ids).reshape(-1)
    unique, inverse = np.unique(ids, return_inverse=True)
    out = np.empty((len(unique), *shape), dtype=np.float32)
    for t, image_id in enumerate(unique.tolist()):
        known = None if rendered is None else rendered.get(image_id)
        out[t] = known if known is not None else _render_one(seed, image_id, tuple(shape))
    return out[inverse.reshape(-1)]


# --------------------------------------------------------------------------- behaviour


def sample_behavior(rng: np.random.Generator, n_trials: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-trial behaviour (T, 3) = [pupil size, d pupil, running speed] and pupil centre (T, 2)."""
    a = rng.standard_normal(n_trials)  # arousal
    running = rng.random(n_trials) < 1.0 / (1.0 + np.exp(-(2.0 * a - 0.5)))
    speed = np.where(
        running,
        rng.lognormal(np.log(12.0) + 0.3 * a, 0.5),
        np.abs(rng.normal(0.0, 0.3, n_trials)),
    )
    pupil = PUPIL_REF * np.exp(0.2 * a + 0.1 * rng.standard_normal(n_trials) + 0.1 * running)
    dpupil = 0.3 * a + 0.4 * rng.standard_normal(n_trials)
    center = np.stack(
        [
            EYE_REF[0] + 10.0 * rng.standard_normal(n_trials) + 3.0 * a,
            EYE_REF[1] + 7.0 * rng.standard_normal(n_trials) - 2.0 * a,
        ],
        axis=1,
    )
    behavior = np.stack([pupil, dpupil, speed], axis=1)
    return behavior.astype(np.float32), np.clip(center, 150.0, 250.0).astype(np.float32)


# --------------------------------------------------------------------------- population


def _softplus(v: np.ndarray) -> np.ndarray:
    return np.logaddexp(np.float32(0.0), v)


def _model_input(images: np.ndarray) -> np.ndarray:
    """(T, C, H, W) grey levels -> standardised (T, C, 36, 64) float32 model-grid images."""
    images = np.asarray(images, dtype=np.float32)
    t, c, h, w = images.shape
    gh, gw = MODEL_GRID
    if h % gh or w % gw:
        raise ValueError(f"image size {(h, w)} is not a multiple of the model grid {MODEL_GRID}")
    if (h, w) != MODEL_GRID:
        images = images.reshape(t, c, gh, h // gh, gw, w // gw).mean(axis=(3, 5))
    return (images - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)


def _shift_images(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Sample each image at (row + dy, col + dx): x'(u) = x(u + d), d = shift[t] = (dx, dy).

    Band-limited (Fourier) shift of the image zero-padded (zero = mean grey) by more than the
    largest possible shift, so nothing wraps around.
    """
    t, c, h, w = x.shape
    pad = int(math.ceil(EYE_SHIFT_MAX)) + 4
    hp, wp = h + 2 * pad, w + 2 * pad
    spec = np.fft.rfft2(np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))), axes=(2, 3))
    ky = np.fft.fftfreq(hp)[None, :, None]
    kx = np.fft.rfftfreq(wp)[None, None, :]
    dx = shift[:, 0].astype(np.float64)[:, None, None]
    dy = shift[:, 1].astype(np.float64)[:, None, None]
    phase = np.exp(2j * np.pi * (ky * dy + kx * dx)).astype(np.complex64)
    out = np.fft.irfft2(spec * phase[:, None], s=(hp, wp), axes=(2, 3))
    return out[:, :, pad : pad + h, pad : pad + w].astype(np.float32)


def _gabor_bank(pop: "Population") -> np.ndarray:
    """Filter matrix (C*36*64, n + n_complex) float32: even filters of all neurons, then the
    odd (quadrature) filters of the complex cells, each spread over channels by channel_weights."""
    gh, gw = MODEL_GRID
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float64)
    yy, xx = yy.reshape(1, -1), xx.reshape(1, -1)
    n, c = pop.channel_weights.shape
    complex_idx = np.flatnonzero(pop.is_complex)
    columns = [(np.arange(n), 0.0), (complex_idx, np.pi / 2)]
    bank = np.empty((c * gh * gw, n + len(complex_idx)), dtype=np.float32)
    col = 0
    for idx_all, phase_offset in columns:
        for start in range(0, len(idx_all), 1024):
            idx = idx_all[start : start + 1024]
            cx, cy = pop.rf_center[idx, 0:1].astype(np.float64), pop.rf_center[idx, 1:2]
            th = pop.orientation[idx, None].astype(np.float64)
            dx, dy = xx - cx, yy - cy
            along = dx * np.cos(th) + dy * np.sin(th)  # along the wave vector
            across = -dx * np.sin(th) + dy * np.cos(th)
            sig = pop.rf_sigma[idx, None].astype(np.float64)
            env = np.exp(-(along**2 + (pop.rf_aspect[idx, None] * across) ** 2) / (2 * sig**2))
            carrier = np.cos(
                2 * np.pi * pop.spatial_frequency[idx, None] * along
                + pop.phase[idx, None]
                + phase_offset
            )
            g = env * carrier
            g -= env * (g.sum(1, keepdims=True) / env.sum(1, keepdims=True))  # no DC response
            g /= np.linalg.norm(g, axis=1, keepdims=True) + 1e-12
            w = pop.channel_weights[idx]  # (k, C)
            block = (w[:, :, None] * g[:, None, :]).reshape(len(idx), -1)
            bank[:, col : col + len(idx)] = block.T
            col += len(idx)
    return bank


@dataclasses.dataclass(frozen=True, eq=False)
class Population:
    """Ground truth of one simulated mouse (see the module docstring for the model).

    Image coordinates are on the 36 x 64 model grid: x = column, y = row (row 0 at the top),
    pixel centres at integers. A model pixel is 4 x 4 pixels of a 144 x 256 grey image.
    """

    cell_motor_coordinates: np.ndarray  # (n, 3) float32, um
    rf_center: np.ndarray  # (n, 2) float32, (x, y) model-grid pixels
    orientation: np.ndarray  # (n,) rad, direction of the Gabor wave vector
    spatial_frequency: np.ndarray  # (n,) cycles per model-grid pixel
    phase: np.ndarray  # (n,) rad
    rf_sigma: np.ndarray  # (n,) envelope sd across the bars, model-grid pixels
    rf_aspect: np.ndarray  # (n,) envelope sd across / along the bars (<= 1: elongated)
    is_complex: np.ndarray  # (n,) bool: energy model (True) or rectified linear (False)
    channel_weights: np.ndarray  # (n, C) float32, weight of each image channel (UV, green)
    drive_mean: np.ndarray  # (n,) mean of the raw drive g on the calibration batch
    drive_std: np.ndarray  # (n,) std of the raw drive g on the calibration batch
    threshold: np.ndarray  # (n,) softplus threshold t, in drive standard units
    slope: np.ndarray  # (n,) softplus slope k
    amplitude: np.ndarray  # (n,) response scale A
    gain_running: np.ndarray  # (n,) b_run
    gain_pupil: np.ndarray  # (n,) b_pup
    gain_pupil_derivative: np.ndarray  # (n,) b_dpup
    eye_shift_matrix: np.ndarray  # (2, 2) model-grid pixels per camera pixel
    eye_reference: np.ndarray  # (2,) camera pixels, pupil centre of zero shift
    shared_gain_sd: np.ndarray  # (n,) c: sd of the log of the shared per-trial gain
    private_gain_var: np.ndarray  # (n,) w: variance of the private mean-1 gamma gain
    event_shape: np.ndarray  # (n,) alpha: gamma shape of one event amplitude
    event_size: np.ndarray  # (n,) q: mean event amplitude (the noise scale)
    target_reliability: np.ndarray  # (n,) rho: calibrated rate-response correlation

    @functools.cached_property
    def _filters(self) -> np.ndarray:
        return _gabor_bank(self)

    def __getstate__(self):  # do not pickle the (large, recomputable) filter bank
        state = dict(self.__dict__)
        state.pop("_filters", None)
        return state

    @property
    def n_neurons(self) -> int:
        return len(self.cell_motor_coordinates)

    def eye_shift(self, pupil_center: np.ndarray) -> np.ndarray:
        """RF displacement d (T, 2) = (dx, dy) in model-grid pixels for pupil centres (T, 2)."""
        p = np.asarray(pupil_center, dtype=np.float64) - self.eye_reference
        return EYE_SHIFT_MAX * np.tanh(p @ self.eye_shift_matrix.T / EYE_SHIFT_MAX)

    def behavior_gain(self, behavior: np.ndarray) -> np.ndarray:
        """Multiplicative gain (T, n) = exp(b_run f_run + b_pup f_pup + b_dpup f_dpup)."""
        b = np.asarray(behavior, dtype=np.float32)
        f_run = 1.0 - np.exp(-np.maximum(b[:, 2:3], 0.0) / RUN_SCALE)
        f_pup = np.tanh((b[:, 0:1] - PUPIL_REF) / PUPIL_SCALE)
        f_dpup = np.tanh(b[:, 1:2] / DPUPIL_SCALE)
        log_gain = (
            f_run * self.gain_running
            + f_pup * self.gain_pupil
            + f_dpup * self.gain_pupil_derivative
        )
        return np.exp(log_gain.astype(np.float32))

    def drive(self, images: np.ndarray, pupil_center: np.ndarray) -> np.ndarray:
        """Raw stimulus drive g (T, n): linear Gabor output (simple cells) or quadrature energy
        (complex cells)."""
        x = _shift_images(_model_input(images), self.eye_shift(pupil_center))
        lin = x.reshape(len(x), -1) @ self._filters
        n = self.n_neurons
        g = lin[:, :n]
        cidx = np.flatnonzero(self.is_complex)
        g[:, cidx] = np.sqrt(g[:, cidx] ** 2 + lin[:, n:] ** 2)
        return g

    def rates(
        self, images: np.ndarray, behavior: np.ndarray, pupil_center: np.ndarray
    ) -> np.ndarray:
        """Noise-free expected responses (T, n) float32 >= 0 for images (T, C, H, W) on 0-255."""
        z = (self.drive(images, pupil_center) - self.drive_mean) / self.drive_std
        r = _softplus(self.slope * (z - self.threshold))
        r *= self.amplitude
        r *= self.behavior_gain(behavior)
        return r.astype(np.float32, copy=False)

    def sample_responses(self, rng: np.random.Generator, rates: np.ndarray) -> np.ndarray:
        """Noisy single trials (T, n) float32 > 0: shared and private gains x compound
        Poisson-gamma events; no-event trials get tiny positive values."""
        rates = np.asarray(rates, dtype=np.float64)
        c = self.shared_gain_sd.astype(np.float64)
        shared = rng.standard_normal((len(rates), 1))
        w = np.maximum(self.private_gain_var.astype(np.float64), 1e-6)
        private = rng.gamma(1.0 / w, w, size=rates.shape)
        mean = rates * np.exp(c * shared - 0.5 * c**2) * private
        alpha = self.event_shape.astype(np.float64)
        q = self.event_size.astype(np.float64)
        events = rng.poisson(mean / q)
        out = rng.gamma(events * alpha, q / alpha)
        zero = out <= 0.0
        out[zero] = rng.uniform(*TINY, size=int(zero.sum()))
        return out.astype(np.float32)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _retinotopy(rng: np.random.Generator, xy: np.ndarray) -> np.ndarray:
    """RF centres (n, 2) on the model grid as a smooth map of cortical (x, y) plus scatter."""
    gh, gw = MODEL_GRID
    lo, hi = xy.min(0), xy.max(0)
    u = (xy - (lo + hi) / 2) / (hi - lo).max()  # in [-1/2, 1/2]
    theta = rng.uniform(-0.35, 0.35)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    scale = np.diag([rng.uniform(22, 28), rng.uniform(16, 22)])
    scale[1, 1] *= rng.choice([-1.0, 1.0])  # V1's map may be mirrored relative to the window
    centre = np.array([gw / 2 + rng.uniform(-6, 6), gh / 2 + rng.uniform(-3, 3)])
    curvature = rng.uniform(-4, 4, size=2)
    c = centre + u @ (rot @ scale).T + curvature * u[:, ::-1] ** 2
    c += rng.normal(0.0, 1.2, size=c.shape)
    return np.clip(c, [1.0, 1.0], [gw - 2.0, gh - 2.0])


def make_population(
    rng: np.random.Generator,
    n_neurons: int,
    image_shape: tuple[int, int, int],
    *,
    n_calibration: int = N_CALIBRATION,
) -> Population:
    """Draw one mouse's neurons and calibrate drive normalisation and noise (module docstring).

    n_calibration: size of the calibration batch (smaller only for quick tests).
    """
    n = int(n_neurons)
    n_channels = int(image_shape[0])
    gh = MODEL_GRID[0]

    side = rng.uniform(600, 900)
    origin = rng.uniform(-400, 400, size=2)
    xy = origin + rng.uniform(0, side, size=(n, 2))
    planes = rng.uniform(100, 140) + np.array([0.0, 1.0, 2.0]) * rng.uniform(60, 100)
    z = rng.choice(planes, size=n)
    coords = np.column_stack([xy, z]).astype(np.float32)
    rf_center = _retinotopy(rng, xy)

    sf = np.clip(rng.lognormal(np.log(0.1), 0.35, n), 0.04, 0.25)
    sigma = np.clip(rng.uniform(0.3, 0.55, n) / sf, 1.2, 5.0)
    if n_channels == 1:
        channel_weights = np.ones((n, 1))
    else:
        logit = 6.0 * (0.5 - rf_center[:, 1] / gh) + rng.normal(0.0, 0.5, n)
        w_uv = 1.0 / (1.0 + np.exp(-logit))
        w_green = np.where(rng.random(n) < 0.05, -(1.0 - w_uv), 1.0 - w_uv)
        channel_weights = np.zeros((n, n_channels))
        channel_weights[:, 0], channel_weights[:, 1] = w_uv, w_green

    diagonal, cross = rng.uniform(0.15, 0.3, 2), rng.normal(0.0, 0.03, 2)
    eye_matrix = np.array([[diagonal[0], cross[0]], [cross[1], diagonal[1]]])

    f32 = _f32
    pop = Population(
        cell_motor_coordinates=coords,
        rf_center=f32(rf_center),
        orientation=f32(rng.uniform(0, np.pi, n)),
        spatial_frequency=f32(sf),
        phase=f32(rng.uniform(0, 2 * np.pi, n)),
        rf_sigma=f32(sigma),
        rf_aspect=f32(rng.uniform(0.55, 1.0, n)),
        is_complex=rng.random(n) < 0.6,
        channel_weights=f32(channel_weights),
        drive_mean=f32(np.zeros(n)),
        drive_std=f32(np.ones(n)),
        threshold=f32(rng.uniform(0.0, 1.2, n)),
        slope=f32(rng.uniform(1.0, 2.5, n)),
        amplitude=f32(rng.lognormal(0.0, 0.5, n)),
        gain_running=f32(rng.normal(0.4, 0.3, n)),
        gain_pupil=f32(rng.normal(0.25, 0.2, n)),
        gain_pupil_derivative=f32(rng.normal(0.05, 0.05, n)),
        eye_shift_matrix=eye_matrix,
        eye_reference=np.array(EYE_REF),
        shared_gain_sd=f32(rng.uniform(0.05, 0.25, n)),
        private_gain_var=f32(np.zeros(n)),
        event_shape=f32(rng.uniform(1.0, 3.0, n)),
        event_size=f32(np.ones(n)),
        target_reliability=f32(np.clip(rng.beta(8.5, 7.9, n), 0.15, 0.85)),
    )
    return calibrate(pop, rng, image_shape, n_calibration)


def calibrate(
    pop: Population,
    rng: np.random.Generator,
    image_shape: tuple[int, int, int],
    n_calibration: int = N_CALIBRATION,
) -> Population:
    """Set the drive normalisation (drive_mean, drive_std) and the noise parameters
    (private_gain_var, event_size) of pop from a fresh calibration batch of natural-like images
    with sampled behaviour, so each neuron's rate-response correlation is its target_reliability.
    """
    n, f32 = pop.n_neurons, _f32
    cal_seed = int(rng.integers(2**31))
    images = render_images(cal_seed, np.arange(n_calibration), tuple(image_shape))
    behavior, pupil = sample_behavior(rng, n_calibration)
    g = pop.drive(images, pupil).astype(np.float64)
    pop = _replace_keep_filters(pop, drive_mean=f32(g.mean(0)), drive_std=f32(g.std(0) + 1e-6))
    r = pop.rates(images, behavior, pupil).astype(np.float64)

    # Noise: the rate-response correlation over trials is rho^2 = var / (var + B) with noise
    # budget B = E[r^2] ((1 + v)(1 + w) - 1) + F E[r] (v, w: variances of the shared and private
    # gains, F: Fano-like factor of the event process). The private gain takes a share phi of
    # B, the event process the rest.
    var, mean, m2 = r.var(0), r.mean(0) + 1e-12, (r**2).mean(0) + 1e-12
    rho = pop.target_reliability.astype(np.float64)
    budget = var * (1.0 / rho**2 - 1.0)
    v = np.expm1(pop.shared_gain_sd.astype(np.float64) ** 2)
    phi = rng.uniform(0.4, 0.8, n)
    w = np.maximum((1.0 + phi * budget / m2) / (1.0 + v) - 1.0, 0.0)
    fano = (budget - m2 * ((1.0 + v) * (1.0 + w) - 1.0)) / mean
    fano = np.maximum(fano, 0.05 * var / mean + 1e-9)
    alpha = pop.event_shape.astype(np.float64)
    return _replace_keep_filters(
        pop, private_gain_var=f32(w), event_size=f32(fano * alpha / (1.0 + alpha))
    )


_FILTER_FIELDS = {
    "rf_center", "orientation", "spatial_frequency", "phase", "rf_sigma", "rf_aspect",
    "is_complex", "channel_weights",
}


def _replace_keep_filters(pop: Population, **changes) -> Population:
    """dataclasses.replace that reuses the cached filter bank (for non-filter fields only)."""
    assert not set(changes) & _FILTER_FIELDS, "filter parameters changed: use dataclasses.replace"
    new = dataclasses.replace(pop, **changes)
    if "_filters" in pop.__dict__:
        new.__dict__["_filters"] = pop.__dict__["_filters"]
    return new


def oracle_correlation(rates: np.ndarray, responses: np.ndarray) -> float:
    """Mean over neurons of the Pearson correlation over trials (population std + 1e-8 each)."""
    a = np.asarray(rates, dtype=np.float64)
    b = np.asarray(responses, dtype=np.float64)
    za = (a - a.mean(0)) / (a.std(0) + 1e-8)
    zb = (b - b.mean(0)) / (b.std(0) + 1e-8)
    return float((za * zb).mean(0).mean())
