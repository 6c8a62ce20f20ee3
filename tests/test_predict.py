"""Predictor and predict CLI: equal to training-time evaluation, .npy / PNG round trips, errors."""

import io
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from configs import synthetic
from v1t_jax import checkpoints, input_pipeline, predict, train

MICE = ["90001-1-1", "90002-2-3", "90003-4-5"]


def make_tiny_run(tmp_path_factory, data_dir):
  """A checkpoint of the tiny config on the three tiny mice (initial weights, saved as `best`).

  Shared on disk by the prediction and submission tests; no training needed to test them.
  """
  workdir = tmp_path_factory.getbasetemp() / "tiny_predict_run"
  config = synthetic.get_config("tiny")
  config.data.data_dir = data_dir
  trainer = train.setup(config)
  if not (workdir / "best").exists():
    state = trainer.init_state(config.seed)
    latest, best = checkpoints.checkpoint_managers(str(workdir))
    checkpoints.save(best, state, {"step": 1, "epoch": 1, "plateau": {}, "run": trainer.run_info})
    best.wait_until_finished()
    latest.close(), best.close()
  return str(workdir), trainer


def zip_trials(zips, meta, trials):
  """Raw images [n, 1, 144, 256], behaviour [n, 3] and pupil centre [n, 2] from the source zip."""
  path = next(z for z in zips if os.path.basename(z) == meta.info["source_name"])
  stem = os.path.basename(path)[: -len(".zip")]
  with zipfile.ZipFile(path) as z:
    def load(field):
      return np.stack([np.load(io.BytesIO(z.read(f"{stem}/data/{field}/{i}.npy"))) for i in trials])
    return load("images"), load("behavior"), load("pupil_center")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data_dir):
  return make_tiny_run(tmp_path_factory, tiny_data_dir)


@pytest.fixture(scope="module")
def predictor(run):
  return predict.Predictor.from_workdir(run[0])


def test_predictions_equal_the_training_evaluation(run, predictor, tiny_zips):
  workdir, trainer = run
  latest, best = checkpoints.checkpoint_managers(workdir)
  state, _ = checkpoints.restore(best, trainer)
  latest.close(), best.close()
  ds, _ = input_pipeline.eval_dataset(trainer.mice, "test", trainer.config.data)
  expected = {m: [] for m in range(3)}
  trials = {m: [] for m in range(3)}
  for b in input_pipeline.as_numpy(ds):
    pred = np.asarray(trainer.eval_step(state["params"], state["buffers"],
                                        trainer.device_batch(b))["pred"])
    for m, meta in enumerate(trainer.mice):
      valid = b["valid"][m]
      expected[m].append(pred[m][valid, : meta.num_neurons])
      trials[m].append(b["trial"][m][valid])

  assert predictor.mice == MICE and predictor.image_hwc == (36, 64, 1)
  for m, meta in enumerate(trainer.mice):
    images, behavior, pupil = zip_trials(tiny_zips, meta, np.concatenate(trials[m]))
    got = predictor.predict(meta.name, images, behavior, pupil, batch_size=8)
    want = np.concatenate(expected[m])
    assert got.shape == (len(images), meta.num_neurons)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.std(got, axis=0).max() > 1e-4          # the predictions do depend on the trial
    np.testing.assert_array_equal(predictor.neuron_ids(meta.data_key), meta.unit_ids)

  # Attention maps of every block and head: [n, L, H, T, T], rows are distributions.
  pred, attention = predictor.predict(MICE[2], images[:3], behavior[:3], pupil[:3], batch_size=8,
                                      return_attention=True)
  np.testing.assert_allclose(pred, want[:3], rtol=1e-5, atol=1e-6)
  model = trainer.config.model
  assert attention.shape == (3, model.num_blocks, model.num_heads, 61, 61)
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)


def test_defaults_are_the_dataset_means(predictor, tiny_zips, tiny_data_dir):
  meta = train.dataset_meta.resolve_mice(tiny_data_dir, (MICE[2],))[0]
  images, behavior, pupil = zip_trials(tiny_zips, meta, [0, 1])
  means = (np.tile(meta.stat("behavior", "mean"), (2, 1)),
           np.tile(meta.stat("pupil_center", "mean"), (2, 1)))
  np.testing.assert_allclose(predictor.predict(MICE[2], images),
                             predictor.predict(MICE[2], images, *means), rtol=1e-6)
  assert not np.allclose(predictor.predict(MICE[2], images),
                         predictor.predict(MICE[2], images, behavior * 3, pupil + 50))


def test_cli_round_trip_npy_and_png(predictor, run, tiny_zips, tiny_data_dir, tmp_path, capsys):
  from PIL import Image
  meta = train.dataset_meta.resolve_mice(tiny_data_dir, (MICE[1],))[0]
  images, behavior, pupil = zip_trials(tiny_zips, meta, range(12))
  assert np.array_equal(images, np.round(images)) and images.max() <= 255   # 8-bit grey levels
  np.save(tmp_path / "x.npy", images)
  np.save(tmp_path / "b.npy", behavior)
  np.save(tmp_path / "p.npy", pupil)
  out = tmp_path / "out" / "y.npy"
  predict.main(["--workdir", run[0], "--mouse", MICE[1], "--images", str(tmp_path / "x.npy"),
                "--behavior", str(tmp_path / "b.npy"), "--pupil_center", str(tmp_path / "p.npy"),
                "--out", str(out), "--batch_size", "8"])
  y = np.load(out)
  np.testing.assert_allclose(y, predictor.predict(MICE[1], images, behavior, pupil), rtol=1e-6)
  np.testing.assert_array_equal(np.load(tmp_path / "out" / "y.neuron_ids.npy"), meta.unit_ids)
  assert '"shape": [12, 31]' in capsys.readouterr().out

  # The same images as PNG files (natural name order: img2 before img10), and twice as large
  # (pixel-repeated 288x512): bilinear 288x512 -> 36x64 averages the same two source pixels per
  # axis as 144x256 -> 36x64, so the predictions are the same.
  pngs, big = tmp_path / "pngs", tmp_path / "big"
  pngs.mkdir(), big.mkdir()
  for i, im in enumerate(images[:, 0].astype(np.uint8)):
    Image.fromarray(im).save(pngs / f"img{i}.png")
    Image.fromarray(im.repeat(2, 0).repeat(2, 1)).save(big / f"img{i}.png")
  for folder in (pngs, big):
    predict.main(["--workdir", run[0], "--mouse", MICE[1], "--images", str(folder),
                  "--behavior", str(tmp_path / "b.npy"), "--pupil_center", str(tmp_path / "p.npy"),
                  "--out", str(tmp_path / folder.name)])
    np.testing.assert_allclose(np.load(tmp_path / f"{folder.name}.npy"), y, rtol=1e-5, atol=1e-6)
  with open(tmp_path / "pngs.images.txt") as f:
    assert f.read().split() == [f"img{i}.png" for i in range(12)]
  # A list of images of several sizes is preprocessed size by size.
  mixed = [images[0], images[1].repeat(2, 1).repeat(2, 2), images[2]]
  np.testing.assert_allclose(predictor.predict(MICE[1], mixed, behavior[:3], pupil[:3]), y[:3],
                             rtol=1e-5, atol=1e-6)


def test_per_mouse_parameters_are_found_for_every_behaviour_mode():
  # behavior_mode 4 stacks one B-MLP per mouse in the core: it must be sliced too.
  cfg = predict.ModelConfig(patch_size=8, patch_stride=8, emb_dim=8, num_heads=1, num_blocks=1,
                            mlp_dim=8, behavior_mode=4)
  _, full, _ = predict._abstract_model(cfg, [5, 7, 3], (36, 64, 1))
  _, one, _ = predict._abstract_model(cfg, [7], (36, 64, 1))
  flat = dict(jax.tree_util.tree_flatten_with_path(predict._per_mouse_mask(full, one, 3))[0])
  stacked = sorted({jax.tree_util.keystr(k[:2]) for k, v in flat.items() if v})
  assert stacked == ["['core']['blocks']", "['readouts']['bias']", "['readouts']['features']",
                     "['readouts']['grid_predictor']", "['readouts']['sigma']",
                     "['shifters']['fc1']", "['shifters']['fc2']", "['shifters']['fc3']"]
  assert all(v for k, v in flat.items() if "bmlp" in jax.tree_util.keystr(k))
  assert not any(v for k, v in flat.items() if "mha" in jax.tree_util.keystr(k))


def test_clear_errors(predictor, run, tmp_path):
  images = np.zeros((2, 1, 144, 256), np.float32)
  with pytest.raises(ValueError, match=r"unknown mouse 'S9'.*knows: 90001-1-1, 90002-2-3, 90003"):
    predictor.predict("S9", images)
  with pytest.raises(ValueError, match=r"\[n, C, H, W\] with C=1 .* got shape \[2, 144, 256\]"):
    predictor.predict(MICE[0], images[:, 0])
  with pytest.raises(ValueError, match=r"behavior must have shape \[n, 3\] = \[2, 3\].*\[2, 2\]"):
    predictor.predict(MICE[0], images, behavior=np.zeros((2, 2)))
  with pytest.raises(ValueError, match=r"pupil_center must have shape \[n, 2\] = \[2, 2\]"):
    predictor.predict(MICE[0], images, pupil_center=np.zeros((3, 2)))
  with pytest.raises(ValueError, match="NaN or inf pixels"):
    predictor.predict(MICE[0], images * np.nan)
  with pytest.raises(FileNotFoundError, match="no such run directory"):
    predict.Predictor.from_workdir(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match=r"no checkpoints \(expected .*best/<step>/"):
    predict.Predictor.from_workdir(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"checkpoints: no complete checkpoint step"):
    predict.Predictor.from_workdir(run[0], which="latest")   # the helper saved only `best`
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 \(saved steps: \[1\]\)"):
    predict.Predictor.from_workdir(run[0], step=7)
  with pytest.raises(ValueError, match=r"--device gpu: no such device on this host \(available: "
                     r"cpu\)"):   # the tests run on CPU only
    predict.Predictor.from_workdir(run[0], device="gpu")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .png files"):
    predict.read_images(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="no such file or folder"):
    predict.read_images(str(tmp_path / "x.npy"))


def test_predict_module_does_not_import_tensorflow():
  code = ("import sys, v1t_jax.predict; "
          "sys.exit(any(m.split('.')[0] == 'tensorflow' for m in sys.modules))")
  assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        timeout=120).returncode == 0


def test_response_fn_of_chosen_neurons_equals_their_columns(predictor):
  """response_fn(mouse, neurons) computes only those neurons' readouts; the values equal those
  columns of the whole mouse's responses, gradients included, and a Subject restricted to them
  (the MEI path) uses it."""
  import jax
  import jax.numpy as jnp

  from v1t_jax.insilico.subject import Subject
  mouse = MICE[1]
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(3, 36, 64, 1)), jnp.float32)
  behavior, pupil = jnp.zeros((3, 3)), jnp.zeros((3, 2))
  full = predictor.response_fn(mouse)(image, behavior, pupil)
  chosen = [30, 0, 7, 7]
  some = predictor.response_fn(mouse, chosen)(image, behavior, pupil)
  assert some.shape == (3, 4)
  np.testing.assert_allclose(some, np.asarray(full)[:, chosen], rtol=1e-6)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x, behavior, pupil)[:, 0]))(image)  # noqa: E731
  np.testing.assert_allclose(grad(predictor.response_fn(mouse, [30])),
                             grad(lambda *a: predictor.response_fn(mouse)(*a)[:, 30:31]),
                             rtol=1e-5, atol=1e-7)
  subject = Subject.from_predictor(predictor, mouse).restricted([30, 0])
  assert subject.num_neurons == 2 and subject.respond(image).shape == (3, 2)
  with pytest.raises(ValueError, match=r"neurons must be in \[0, 31\)"):
    predictor.response_fn(mouse, [31])
