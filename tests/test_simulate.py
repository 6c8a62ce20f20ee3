"""Tests of the ground-truth V1 simulator (data_prep/simulate.py)."""

import dataclasses

import numpy as np
import pytest

from data_prep import simulate as sim

GREY = (1, 144, 256)
COLOUR = (2, 36, 64)
N_NEURONS = 200
N_TRAIN, N_VAL, N_TEST = 1600, 200, 400


@pytest.fixture(scope="module")
def population():
    return sim.make_population(np.random.default_rng(0), N_NEURONS, GREY)


@pytest.fixture(scope="module")
def dataset(population):
    """Fresh natural-like images (not the calibration ones), behaviour, rates and responses."""
    rng = np.random.default_rng(1)
    n = N_TRAIN + N_VAL + N_TEST
    images = sim.render_images(11, np.arange(n), GREY)
    behavior, pupil = sim.sample_behavior(rng, n)
    rates = population.rates(images, behavior, pupil)
    responses = population.sample_responses(rng, rates)
    return images, behavior, pupil, rates, responses


def _per_neuron_corr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    za = (a - a.mean(0)) / (a.std(0) + 1e-8)
    zb = (b - b.mean(0)) / (b.std(0) + 1e-8)
    return (za * zb).mean(0)


# ------------------------------------------------------------------ images


@pytest.mark.parametrize("shape", [GREY, COLOUR])
def test_render_is_deterministic_and_batch_independent(shape):
    ids = np.array([5, 9, 4242, 17])
    a = sim.render_images(3, ids, shape)
    assert a.shape == (4, *shape) and a.dtype == np.float32
    np.testing.assert_array_equal(a, sim.render_images(3, ids, shape))
    np.testing.assert_array_equal(a[2:3], sim.render_images(3, np.array([4242]), shape))
    np.testing.assert_array_equal(a[::-1], sim.render_images(3, ids[::-1], shape))
    assert not np.array_equal(a, sim.render_images(4, ids, shape))  # seed matters
    assert not np.array_equal(a[0], a[1])  # ids differ
    np.testing.assert_array_equal(sim.render_images(3, np.array([9, 4242, 9]), shape), a[[1, 2, 1]])
    # Already rendered images are taken from the mapping, the others rendered.
    marker = np.full(shape, 7.0, np.float32)
    b = sim.render_images(3, np.array([9, 4242, 9]), shape, {9: marker})
    np.testing.assert_array_equal(b, np.stack([marker, a[2], marker]))


def test_grey_image_statistics_and_spectrum():
    x = sim.render_images(7, np.arange(100), GREY)
    np.testing.assert_array_equal(x, np.rint(x))  # integer grey levels: lossless uint8
    assert x.min() >= 0 and x.max() <= 255
    assert abs(x.mean() - 113.5) < 6
    assert abs(x.std() - 64.6) < 6
    # Natural images: radially averaged power falls ~1/f^2 (white noise would be flat, slope 0).
    img = x[:, 0] - x[:, 0].mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(img)) ** 2).mean(0)
    f = np.hypot(np.fft.fftfreq(144)[:, None], np.fft.fftfreq(256)[None, :])
    band = (f > 0.01) & (f < 0.4)
    slope = np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0]
    assert -3.0 < slope < -1.5, slope
    # Not one fixed picture: images differ in mean luminance and contrast.
    assert x.mean(axis=(1, 2, 3)).std() > 5


def test_colour_channels_correlated_not_identical():
    x = sim.render_images(7, np.arange(60), COLOUR)
    np.testing.assert_array_equal(x, np.rint(x))
    assert x.min() >= 0 and x.max() <= 255
    assert abs(x.mean() - 113.5) < 10 and abs(x.std() - 64.6) < 10
    r = np.corrcoef(x[:, 0].ravel(), x[:, 1].ravel())[0, 1]
    assert 0.5 < r < 0.95, r


# ------------------------------------------------------------------ behaviour


def test_behavior_shapes_ranges_and_arousal_coupling():
    behavior, pupil = sim.sample_behavior(np.random.default_rng(5), 4000)
    b2, p2 = sim.sample_behavior(np.random.default_rng(5), 4000)
    np.testing.assert_array_equal(behavior, b2)
    np.testing.assert_array_equal(pupil, p2)
    assert behavior.shape == (4000, 3) and behavior.dtype == np.float32
    assert pupil.shape == (4000, 2) and pupil.dtype == np.float32
    size, dsize, speed = behavior.T
    assert size.min() > 0
    assert speed.min() >= 0
    assert np.mean(speed < 1.0) > 0.3  # often still
    assert np.percentile(speed, 95) > 10  # sometimes running fast
    assert pupil.min() >= 150 and pupil.max() <= 250
    assert 170 < pupil[:, 0].mean() < 230 and 170 < pupil[:, 1].mean() < 230
    # Shared arousal latent: dilation, its derivative and running correlate positively.
    assert np.corrcoef(size, speed)[0, 1] > 0.2
    assert np.corrcoef(size, dsize)[0, 1] > 0.2


# ------------------------------------------------------------------ population


def test_population_shapes_and_cortical_coordinates(population):
    n = N_NEURONS
    xyz = population.cell_motor_coordinates
    assert xyz.shape == (n, 3) and xyz.dtype == np.float32
    extent = np.ptp(xyz[:, :2], axis=0)
    assert np.all((extent > 500) & (extent < 950)), extent
    planes = np.unique(xyz[:, 2])
    assert 2 <= len(planes) <= 3 and planes.min() >= 100 and planes.max() <= 340
    assert population.rf_center.shape == (n, 2)
    assert 0.2 < population.is_complex.mean() < 0.9  # a mix of simple and complex cells
    assert np.mean(population.gain_running > 0) > 0.75  # mostly positive gains
    assert np.mean(population.gain_pupil > 0) > 0.75


def test_make_population_is_deterministic():
    a = sim.make_population(np.random.default_rng(9), 50, COLOUR, n_calibration=60)
    b = sim.make_population(np.random.default_rng(9), 50, COLOUR, n_calibration=60)
    for field in a.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_retinotopy_is_smooth(population):
    xy = population.cell_motor_coordinates[:, :2].astype(np.float64)
    rf = population.rf_center.astype(np.float64)
    design = np.column_stack([xy, xy**2, np.ones(len(xy))])
    for k in range(2):  # each RF coordinate is (nearly) a smooth function of cortical position
        fit = design @ np.linalg.lstsq(design, rf[:, k], rcond=None)[0]
        r2 = 1 - np.var(rf[:, k] - fit) / np.var(rf[:, k])
        assert r2 > 0.8, (k, r2)
    # Nearest cortical neighbours have much closer RFs than random pairs.
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nn = d.argmin(1)
    near = np.linalg.norm(rf - rf[nn], axis=1).mean()
    rand = np.linalg.norm(rf - rf[np.random.default_rng(0).permutation(len(rf))], axis=1).mean()
    assert near < 0.4 * rand, (near, rand)


def test_colour_population_uv_weight_follows_elevation():
    pop = sim.make_population(np.random.default_rng(2), 300, COLOUR, n_calibration=80)
    assert pop.channel_weights.shape == (300, 2)
    uv = pop.channel_weights[:, 0]
    # Upper visual field = small row index = more UV.
    assert np.corrcoef(uv, pop.rf_center[:, 1])[0, 1] < -0.5
    images = sim.render_images(1, np.arange(30), COLOUR)
    behavior, pupil = sim.sample_behavior(np.random.default_rng(0), 30)
    r = pop.rates(images, behavior, pupil)
    assert r.shape == (30, 300) and r.dtype == np.float32 and r.min() >= 0


# ------------------------------------------------------------------ responses


def test_rates_and_responses_format(population, dataset):
    _, _, _, rates, responses = dataset
    n_trials = N_TRAIN + N_VAL + N_TEST
    assert rates.shape == responses.shape == (n_trials, N_NEURONS)
    assert rates.dtype == responses.dtype == np.float32
    assert rates.min() >= 0 and np.isfinite(rates).all()
    assert responses.min() > 0 and np.isfinite(responses).all()  # no exact zeros
    tiny = responses < 1e-8
    assert responses[tiny].min() >= 1e-9
    assert 0.3 < tiny.mean() < 0.95  # sparse
    assert responses.max() > 10 * np.median(responses)
    again = [population.sample_responses(np.random.default_rng(4), rates[:50]) for _ in range(2)]
    np.testing.assert_array_equal(*again)
    # Responses scatter around the rates (unbiased noise on average).
    assert abs(responses.mean() / rates.mean() - 1) < 0.1


def test_oracle_correlation_metric():
    rng = np.random.default_rng(0)
    a = rng.random((100, 5))
    assert sim.oracle_correlation(a, 3 * a + 1) == pytest.approx(1.0, abs=1e-6)
    assert sim.oracle_correlation(a, -a) == pytest.approx(-1.0, abs=1e-6)
    assert sim.oracle_correlation(a, np.ones_like(a)) == 0.0  # constant response, no NaN


def test_oracle_correlation_is_calibrated(dataset):
    _, _, _, rates, responses = dataset
    test = slice(N_TRAIN + N_VAL, None)
    rho = sim.oracle_correlation(rates[test], responses[test])
    assert 0.4 <= rho <= 0.6, rho
    per_neuron = _per_neuron_corr(rates[test], responses[test])
    assert per_neuron.std() > 0.05  # neurons differ in reliability


def test_behavior_gain_direction(population, dataset):
    images, behavior, pupil, _, _ = dataset
    images, pupil = images[:40], pupil[:40]
    still, running = behavior[:40].copy(), behavior[:40].copy()
    still[:, 2], running[:, 2] = 0.0, 30.0
    ratio = population.rates(images, running, pupil) / population.rates(images, still, pupil)
    log_ratio = np.log(ratio).mean(0)
    pos = population.gain_running > 0
    assert np.all(log_ratio[pos] > 0) and np.all(log_ratio[~pos] < 0)
    assert np.mean(log_ratio) > 0.1  # running scales the population up
    small, large = behavior[:40].copy(), behavior[:40].copy()
    small[:, 0], large[:, 0] = 15.0, 30.0
    ratio = population.rates(images, large, pupil) / population.rates(images, small, pupil)
    log_ratio = np.log(ratio)
    pos = population.gain_pupil > 0
    assert np.all(log_ratio.mean(0)[pos] > 0) and np.mean(log_ratio) > 0.1


def test_eye_position_shifts_receptive_fields(population):
    """Show each neuron its own preferred Gabor displaced by delta: the response is larger when
    the pupil sits where the RF shift is delta than at the reference position."""
    n = 40
    delta = np.array([3.0, -2.0])  # model-grid pixels (x, y)
    moved = population.rf_center + delta.astype(np.float32)
    shifted = dataclasses.replace(population, rf_center=moved)
    filters = shifted._filters[:, :n].T.reshape(n, 36, 64)
    filters = filters / np.abs(filters).max(axis=(1, 2), keepdims=True)
    images = np.clip(113.5 + 60 * np.kron(filters, np.ones((4, 4))), 0, 255)[:, None]
    m = population.eye_shift_matrix
    target = population.eye_reference + np.linalg.solve(
        m, sim.EYE_SHIFT_MAX * np.arctanh(delta / sim.EYE_SHIFT_MAX)
    )
    np.testing.assert_allclose(population.eye_shift(target[None])[0], delta, atol=1e-6)
    behavior = np.tile([[22.0, 0.0, 0.0]], (n, 1))

    def at(p):  # each neuron's response to its own image with the pupil at p
        return np.diag(population.rates(images, behavior, np.tile(p, (n, 1))))

    r_ref = at(population.eye_reference)
    r_target = at(target)
    r_away = at(2 * population.eye_reference - target)  # shift -delta
    assert np.mean(r_target > r_ref) > 0.9
    assert np.mean(r_target > r_away) > 0.9
    assert np.median(r_target / r_ref) > 1.2
    np.testing.assert_allclose(population.eye_shift(population.eye_reference[None]), 0, atol=1e-9)


def test_linear_model_is_clearly_worse_than_truth(dataset):
    """Ridge regression from 18x32 block-averaged pixels plus behaviour and pupil (standardised)
    to the noisy responses, fitted on 1,600 trials, ridge strength chosen on 200 validation trials
    by single-trial correlation, scored on 400 held-out images. Criterion: its single-trial
    correlation with the noisy responses is below 0.8 x that of the true rates (the ceiling any
    model can reach), and its correlation with the true rates is below 0.8."""
    images, behavior, pupil, rates, responses = dataset
    n = len(images)
    pix = images[:, 0].reshape(n, 18, 8, 32, 8).mean(axis=(2, 4)).reshape(n, -1)
    x = np.column_stack([pix, behavior, pupil]).astype(np.float64)
    tr, va, te = slice(0, N_TRAIN), slice(N_TRAIN, N_TRAIN + N_VAL), slice(N_TRAIN + N_VAL, None)
    x = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)
    y_mean = responses[tr].mean(0)
    u, s, vt = np.linalg.svd(x[tr], full_matrices=False)
    uty = u.T @ (responses[tr] - y_mean)
    best = None
    for lam in 10.0 ** np.arange(0, 6.5, 0.5):
        w = vt.T @ ((s / (s**2 + lam))[:, None] * uty)
        score = sim.oracle_correlation(x[va] @ w + y_mean, responses[va])
        if best is None or score > best[0]:
            best = (score, w)
    pred = x[te] @ best[1] + y_mean
    linear = sim.oracle_correlation(pred, responses[te])
    truth = sim.oracle_correlation(rates[te], responses[te])
    linear_vs_rates = sim.oracle_correlation(pred, rates[te])
    print(f"linear->noisy {linear:.3f} truth->noisy {truth:.3f} linear->rates {linear_vs_rates:.3f}",
          end=" ")
    assert linear > 0.02  # the linear model does learn something
    assert linear < 0.8 * truth
    assert linear_vs_rates < 0.8
