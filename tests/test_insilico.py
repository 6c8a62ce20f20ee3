"""In-silico experiments: answers known by construction (a planted Gabor population), the ground
truth's conventions, and the CLI on a tiny run with --truth."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_predict import MICE, make_tiny_run   # the shared tiny checkpoint
from v1t_jax import predict
from v1t_jax.insilico import __main__ as cli
from v1t_jax import insilico as ex
from v1t_jax.insilico import truth as truth_lib

H, W = 24, 32
# Planted neurons: centre x, y (px), orientation (rad), spatial frequency (c/px), envelope sd, simple.
PLANTED = [(8.0, 8.0, 0.3, 0.12, 3.0, True), (22.0, 14.0, 1.2, 0.10, 3.5, False),
           (15.0, 6.0, 2.2, 0.15, 2.5, True), (26.0, 18.0, 2.8, 0.08, 4.0, False)]
SIMPLE = np.array([p[5] for p in PLANTED])


def gabor(cx, cy, theta, f, sigma, phase):
  """Unit-norm, zero-mean Gabor on the H x W grid, in the simulator's conventions."""
  yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
  along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
  across = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
  env = np.exp(-(along**2 + across**2) / (2 * sigma**2))
  g = env * np.cos(2 * np.pi * f * along + phase)
  g -= env * g.sum() / env.sum()
  return (g / np.linalg.norm(g)).astype(np.float32)


EVEN = np.stack([gabor(*p[:5], 0.0) for p in PLANTED])
ODD = np.stack([gabor(*p[:5], np.pi / 2) for p in PLANTED])


def planted_respond(x_BxHxWx1):
  """Fixed Gabor core read at one location per neuron: ELU(2 drive - 1) + 1, drive = the even
  filter's output (simple) or the quadrature energy (complex)."""
  e = jnp.einsum("bhw,nhw->bn", x_BxHxWx1[..., 0], EVEN)
  o = jnp.einsum("bhw,nhw->bn", x_BxHxWx1[..., 0], ODD)
  drive = jnp.where(SIMPLE, e, jnp.sqrt(e**2 + o**2 + 1e-6))
  return jax.nn.elu(2.0 * drive - 1.0) + 1.0


@pytest.fixture(scope="module")
def planted():
  lo, hi = np.array([-2.0], np.float32), np.array([2.0], np.float32)
  return ex.Subject(planted_respond, (H, W, 1), len(PLANTED), lo, hi, name="planted")


def test_meis_maximise_the_activation_under_the_norm_and_match_the_filter(planted):
  norm = 4.0
  # Plain gradient ascent reaches the optimum; blur and jitter (the defaults) trade a little of
  # it for smoother images.
  res = ex.meis(planted, [0, 1, 2, 3], seeds=(0, 1), steps=100, norm=norm, clip=False,
                precondition="none", jitter=0)
  optimum = 2.0 * norm - 1.0 + 1.0          # drive = norm when the image is norm x the filter
  np.testing.assert_allclose(res["norms"], norm, rtol=1e-4)
  assert res["activations"].min() > 0.99 * optimum
  smooth = ex.meis(planted, [0, 1, 2, 3], seeds=(0,), steps=100, norm=norm, clip=False)
  assert smooth["activations"].min() > 0.9 * optimum
  assert res["trace"].shape == (100, 4, 2)
  assert np.all(res["trace"][-1] > res["trace"][0])
  for i in range(4):
    for s in range(2):
      mei = res["images"][i, s, ..., 0].ravel()
      if SIMPLE[i]:    # the MEI of a linear-nonlinear cell is the filter itself
        assert np.corrcoef(mei, EVEN[i].ravel())[0, 1] > 0.9
      energy = (mei @ EVEN[i].ravel()) ** 2 + (mei @ ODD[i].ravel()) ** 2
      assert energy / (mei @ mei) > 0.85     # any phase of the quadrature pair for complex cells
  # Random images of the same norm excite far less.
  rand = np.random.default_rng(0).standard_normal((64, H, W, 1)).astype(np.float32)
  rand *= norm / np.linalg.norm(rand.reshape(64, -1), axis=1)[:, None, None, None]
  assert ex.evaluate(planted, rand).max() < 0.6 * optimum


def test_mei_of_a_neuron_does_not_depend_on_the_batch_and_fourier_and_clip_work(planted):
  kw = dict(seeds=(3,), steps=30, norm=4.0, precondition="fourier", jitter=1)
  alone = ex.meis(planted, [2], **kw)
  together = ex.meis(planted, [0, 2], **kw)
  np.testing.assert_allclose(alone["images"][0], together["images"][1], atol=1e-4)
  assert np.corrcoef(alone["images"][0, 0, ..., 0].ravel(), EVEN[2].ravel())[0, 1] > 0.8
  clipped = ex.meis(planted, [0], seeds=(0,), steps=30, norm=20.0)
  assert clipped["images"].max() <= 2.0 + 1e-6 and clipped["images"].min() >= -2.0 - 1e-6


def test_gaussian_fit_recovers_a_planted_gaussian():
  yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
  params = (2.0, 11.3, 9.7, 3.0, 1.5, 0.6, 0.1)
  maps = ex.gaussian_2d((xx, yy), *params).reshape(1, H, W, 1)
  # The fit sees |standardised map|: a Gaussian stays a Gaussian (other amplitude and offset).
  fit = ex.fit_gaussian_2d(maps)[0]
  np.testing.assert_allclose(fit[1:5], params[1:5], atol=1e-3)
  assert abs(fit[5] - params[5]) < 1e-3 and fit[7] > 0.999
  assert np.isnan(ex.fit_gaussian_2d(np.zeros((1, H, W, 1))) ).all()   # a flat map has no fit


def test_receptive_fields_find_the_planted_centres(planted):
  res = ex.receptive_fields(planted, n_noise=20000, batch_size=2000, seed=1)
  true = np.array([p[:2] for p in PLANTED])
  err = {k: np.linalg.norm(c - true, axis=1) for k, c in res["center"].items()}
  assert np.all(err["sta"][SIMPLE] < 1.0) and np.all(err["grad"][SIMPLE] < 0.5)
  assert np.all(err["sta2"][~SIMPLE] < 1.5)              # complex cells: second order only
  assert np.isnan(res["fits"]["grad"][~SIMPLE, 1]).all()  # energy model: flat gradient at grey
  # The combined map localises both kinds, as does truth's choice of centre.
  assert np.all(err["combined"] < 1.0)
  np.testing.assert_array_equal(ex.rf_centers(res), res["center"]["combined"])


def test_grating_tuning_finds_orientation_sf_and_simple_vs_complex(planted):
  res = ex.grating_tuning(planted, orientations=16, phases=8)
  true_ori = np.array([p[2] for p in PLANTED])
  assert np.all(truth_lib.orientation_error_deg(res["preferred_orientation"], true_ori) < 3.0)
  np.testing.assert_allclose(res["preferred_sf"], [p[3] for p in PLANTED], rtol=0.15)
  np.testing.assert_array_equal(res["is_simple"], SIMPLE)
  assert np.all(res["osi"] > 0.8)
  centred = ex.grating_tuning(planted, [0, 1], orientations=8, phases=4,
                              centers=np.array([p[:2] for p in PLANTED[:2]]), aperture_sigma=5.0)
  assert np.all(truth_lib.orientation_error_deg(centred["preferred_orientation"],
                                                true_ori[:2]) < 6.0)


def test_tuning_summary_on_known_response_curves():
  """Half-wave rectified sinusoid: F1/F0 = pi / 2; a constant response: 0 (complex)."""
  ori, sf, ph = np.arange(4) * np.pi / 4, np.array([0.05, 0.1, 0.2]), np.arange(64) * np.pi / 32
  r = np.zeros((2, 4, 3, 64))
  r[0, 1, 1] = np.maximum(np.cos(ph), 0)           # simple, prefers 45 deg at 0.1 c/px
  r[1, 3, 2] = 1.0                                 # complex, prefers 135 deg at 0.2 c/px
  s = ex.tuning_summary(r, np.zeros(2), ori, sf, ph)
  np.testing.assert_allclose(s["f1_f0"][0], np.pi / 2, rtol=2e-3)   # 64 phase samples
  assert s["f1_f0"][1] < 1e-9 and list(s["is_simple"]) == [True, False]
  np.testing.assert_allclose(np.degrees(s["preferred_orientation"]), [45, 135], atol=1e-6)
  np.testing.assert_allclose(s["preferred_sf"], [0.1, 0.2], rtol=1e-6)
  np.testing.assert_allclose(s["osi"], 1.0)


def test_orientation_error_wraps_at_180_degrees():
  np.testing.assert_allclose(
      truth_lib.orientation_error_deg(np.radians([179.0, 10.0, 90.0]), np.radians([1.0, 170.0, 0])),
      [2.0, 20.0, 90.0], atol=1e-9)


def test_true_rf_centre_moves_with_the_eye(tiny_zips):
  """The simulator's RF in image coordinates is rf_center + eye_shift(pupil): the gradient of
  the truth model's simple cells at grey lands there, not at rf_center."""
  path, _ = truth_lib.find_truth_file(MICE[2], os.path.dirname(tiny_zips[0]))
  pop = truth_lib.load_population(path)
  pupil = np.array([240.0, 170.0], np.float32)     # far from the reference: shift of a few px
  props = truth_lib.true_properties(pop, pupil)
  assert np.linalg.norm(props["eye_shift"]) > 3.0

  class Record:   # the fields truth_subject reads
    image_mean, image_std = np.array([113.5], np.float32), np.array([64.6], np.float32)
  subject = truth_lib.truth_subject(pop, Record, (36, 64, 1), [22.0, 0.0, 5.0], pupil)
  simple = np.flatnonzero(props["is_simple"])[:4]
  eps = 0.05   # central differences of the (NumPy) truth model around the grey image
  bump = np.eye(36 * 64, dtype=np.float32).reshape(-1, 36, 64, 1) * eps
  r = ex.evaluate(subject, np.concatenate([bump, -bump]), 1152)[:, simple]
  sta = ((r[: len(bump)] - r[len(bump):]) / (2 * eps)).T.reshape(-1, 36, 64, 1)
  centers = ex.fit_gaussian_2d(sta)[:, 1:3]
  near_true = np.linalg.norm(centers - props["center"][simple], axis=1)
  near_unshifted = np.linalg.norm(centers - pop.rf_center[simple], axis=1)
  assert np.all(near_true < 1.5) and np.all(near_unshifted > 2.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data_dir):
  return make_tiny_run(tmp_path_factory, tiny_data_dir)[0]


def test_cli_truth_on_a_tiny_run(tiny_run, tiny_zips, tmp_path, capsys):
  out = tmp_path / "insilico"
  args = ["--workdir", tiny_run, "--mouse", MICE[2], "--truth", "--truth_zips",
          os.path.dirname(tiny_zips[0]), "--out", str(out), "--n_noise", "1000",
          "--orientations", "8", "--phases", "4", "--batch_size", "64"]
  summary = cli.main(args)
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads(json.dumps(summary))
  for key in ("rf_center_error_px", "orientation_error_deg", "simple_complex_accuracy"):
    assert np.isfinite(summary[key])
    assert np.isfinite(summary["ground_truth_model"][key])
  assert 0.0 <= summary["simple_complex_accuracy"] <= 1.0
  for name in ("rf", "tuning", "recovery"):
    assert (out / f"{name}.npz").is_file() and (out / f"{name}.png").is_file()
  rec = np.load(out / "recovery.npz")
  n = predict.Predictor.from_workdir(tiny_run).mouse(MICE[2]).neurons
  assert rec["test_correlation"].shape == (n,) and summary["neurons"] == len(rec["selected"])
  assert len(rec["selected"]) == int(np.sum(rec["test_correlation"] >= np.median(
      rec["test_correlation"])))

  cli.main(["--workdir", tiny_run, "--mouse", MICE[0], "--what", "meis", "--neurons", "0-2",
            "--seeds", "2", "--steps", "3", "--out", str(out)])
  meis = np.load(out / "meis.npz")
  assert meis["images"].shape == (3, 2, 36, 64, 1) and meis["trace"].shape == (3, 3, 2)
  assert (out / "meis.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--what", "mei"], "--what: unknown experiment(s) ['mei']"),
    ([], "--what: say which experiments to run"),
])
def test_cli_rejects_bad_arguments(args, message, tiny_run):
  # As users meet it: exit code 1 and one line (the checkpoint's errors: in-process below).
  result = subprocess.run([sys.executable, "-m", "v1t_jax.insilico", "--workdir", tiny_run,
                           "--mouse", MICE[2], *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert result.returncode == 1 and message in result.stderr


def test_cli_rejects_unknown_neurons_and_a_missing_truth(tiny_run, tmp_path):
  with pytest.raises(ValueError, match=r"--neurons: cannot read '3-1'"):
    cli.main(["--workdir", tiny_run, "--mouse", MICE[2], "--what", "rf", "--neurons", "3-1"])
  with pytest.raises(ValueError, match=r"--neurons: indices must be in 0-"):
    cli.main(["--workdir", tiny_run, "--mouse", MICE[2], "--what", "rf", "--neurons", "0,999"])
  with pytest.raises(FileNotFoundError, match="no ground truth for mouse"):
    cli.main(["--workdir", tiny_run, "--mouse", MICE[2], "--truth", "--truth_zips",
              str(tmp_path)])
