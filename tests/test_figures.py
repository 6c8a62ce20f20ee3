"""Figures: PNGs of the expected size from synthetic arrays, scalars from event files, the CLI
end to end on a tiny trained run, and the TensorBoard images of a training state."""

import os

import numpy as np
import pytest
from PIL import Image

from configs import synthetic
from v1t_jax import figures

RNG = np.random.default_rng(0)


def check_png(fig, path):
  """Saved PNG has the figure's pixel size, equals to_rgb's shape and is not blank."""
  figures.save_png(fig, path)
  width, height = fig.canvas.get_width_height()
  np.testing.assert_allclose((width, height), fig.get_size_inches() * figures.DPI, atol=1)
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == (width, height)
    pixels = np.asarray(im.convert("RGB"))
  rgb = figures.to_rgb(fig)
  assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)
  assert pixels.std() > 10   # drawn, not a blank canvas
  return pixels


def test_rollout_figure(tmp_path):
  images = RNG.normal(size=(3, 36, 64, 1))
  heat = RNG.uniform(size=(3, 36, 64))
  fig = figures.plot_rollout(images, heat, ["A trial 1", "A trial 2", "A trial 3"], "rollout A")
  check_png(fig, str(tmp_path / "rollout.png"))
  axes = [ax for ax in fig.axes if ax.images]
  assert len(axes) == 9 and axes[0].get_title(loc="left") == "A trial 1"
  assert len(axes[2].images) == 2   # overlay: image + heat map


def test_responses_figure(tmp_path):
  recorded = RNG.gamma(1.0, size=(200, 4))
  predicted = recorded + RNG.normal(scale=0.3, size=recorded.shape)
  titles = [f"A neuron {i}" for i in range(4)]
  fig = figures.plot_responses(recorded, predicted, titles, "mouse A")
  check_png(fig, str(tmp_path / "responses.png"))
  assert [ax.get_title() for ax in fig.axes[:4]] == titles
  # Scatter of every trial on top; traces of the first MAX_TRACE_TRIALS trials below.
  assert len(fig.axes[0].collections[0].get_offsets()) == 200
  assert len(fig.axes[4].lines[0].get_xdata()) == figures.MAX_TRACE_TRIALS


def numpy_correlations(x_TxN, y_TxN):
  """Per-neuron Pearson r, written out independently of v1t_jax.metrics."""
  xc, yc = x_TxN - x_TxN.mean(0), y_TxN - y_TxN.mean(0)
  with np.errstate(invalid="ignore", divide="ignore"):   # silent neuron: NaN
    return (xc * yc).sum(0) / np.sqrt((xc ** 2).sum(0) * (yc ** 2).sum(0))


def test_response_figure_shows_distribution_median_and_oracle(tmp_path):
  trials, n = 150, 40
  truth = RNG.gamma(2.0, size=(trials, n))
  recorded = truth + RNG.normal(scale=1.0, size=(trials, n))
  predicted = truth + RNG.normal(scale=np.linspace(0.5, 4.0, n), size=(trials, n))
  recorded[:, 7] = 0.0   # a silent neuron: NaN, left out of the distribution
  t = figures.MouseTier("A", np.arange(100, 100 + n), recorded, predicted,
                        RNG.normal(size=(1, 36, 64, 1)), RNG.uniform(size=(1, 36, 64)),
                        np.array([0]), np.array([0]), oracle=truth)
  figs = figures.tier_figures([t], "validation", 3)
  fig = figs["responses/A"]
  check_png(fig, str(tmp_path / "responses.png"))
  model_r, oracle_r = numpy_correlations(predicted, recorded), numpy_correlations(truth, recorded)
  active = np.arange(n) != 7
  (dist,) = [ax for ax in fig.axes if ax.get_title() == figures.DISTRIBUTION_TITLE]
  model_line, oracle_line = [line for line in dist.lines if len(line.get_xdata()) > 2]
  np.testing.assert_allclose(model_line.get_xdata(), np.sort(model_r[active]), atol=1e-5)
  np.testing.assert_allclose(oracle_line.get_xdata(), np.sort(oracle_r[active]), atol=1e-5)
  np.testing.assert_allclose(model_line.get_ydata(), np.arange(1, n) / (n - 1))
  # Columns: the 3 best neurons by the NumPy r, then the one nearest the median.
  order = np.argsort(-np.where(active, model_r, -np.inf))
  median = np.argmin(np.abs(np.where(active, model_r, np.inf) - np.median(model_r[active])))
  titles = [ax.get_title() for ax in fig.axes[:4]]
  assert [int(x.split("neuron ")[1].split()[0]) - 100 for x in titles] == [*order[:3], median]
  assert "(median)" in titles[3] and "oracle median" in fig.get_suptitle()


def test_best_neurons_skips_nan():
  corr = np.array([0.1, np.nan, 0.5, -0.2, 0.3])
  np.testing.assert_array_equal(figures.best_neurons(corr, 3), [2, 4, 0])
  assert figures.best_neurons(corr, 10)[-1] == 1   # NaN last


def test_readout_positions_figure(tmp_path):
  map_hw = (29, 57)
  corners = np.array([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]])
  np.testing.assert_allclose(figures.grid_to_map(corners, map_hw), [[0, 0], [56, 28], [28, 14]])
  positions = {m: RNG.uniform(-1, 1, size=(n, 2)) for m, n in (("A", 30), ("B", 50))}
  colors = {"A": RNG.uniform(size=30), "B": np.full(50, np.nan)}
  fig = figures.plot_readout_positions(positions, map_hw, colors, "correlation")
  check_png(fig, str(tmp_path / "positions.png"))
  assert [ax.get_title() for ax in fig.axes[:2]] == ["A: 30 neurons", "B: 50 neurons"]
  assert len(fig.axes[1].collections[0].get_offsets()) == 50   # NaN values still drawn (grey)


def test_read_scalars_and_curves(tmp_path):
  from clu import metric_writers
  workdir = str(tmp_path)
  writer = metric_writers.create_default_writer(workdir)
  for step in (3, 6, 9):
    writer.write_scalars(step, {"train/loss": 100.0 - step, "train/lr": 0.01,
                                "val/single_trial_correlation/average": step / 100,
                                "val/single_trial_correlation/A": step / 50})
  writer.flush()
  resumed = metric_writers.create_default_writer(workdir)   # a resume repeats step 9
  resumed.write_scalars(9, {"train/loss": 1.0})
  resumed.write_scalars(12, {"train/loss": 0.5})
  resumed.flush()
  curves = figures.read_scalars(workdir)
  np.testing.assert_array_equal(curves["train/loss"][0], [3, 6, 9, 12])
  np.testing.assert_allclose(curves["train/loss"][1], [97, 94, 1, 0.5])   # last write wins
  fig = figures.plot_training_curves(curves)
  check_png(fig, str(tmp_path / "curves.png"))
  titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
  assert titles == ["training loss", "validation correlation", "learning rate"]
  with pytest.raises(ValueError, match="no training scalars"):
    figures.plot_training_curves({"other": (np.arange(2), np.zeros(2))})


@pytest.fixture
def tiny_run(one_epoch_copy, one_epoch_run):
  """(config, workdir) of a copy of conftest's one_epoch_run (tests here write figures to it)."""
  return one_epoch_run[1], one_epoch_copy


def test_cli_end_to_end(tiny_run, tmp_path):
  config, workdir = tiny_run
  out = str(tmp_path / "figs")
  paths = figures.main(["--workdir", workdir, "--data_dir", config.data.data_dir, "--out", out,
                        "--num_images", "1", "--num_neurons", "3"])
  names = sorted(os.path.basename(p) for p in paths)
  mice = ["90001-1-1", "90002-2-3", "90003-4-5"]
  assert names == sorted([f"rollout_{m}.png" for m in mice] + [f"responses_{m}.png" for m in mice]
                         + ["readout_positions.png", "training_curves.png"])
  for p in paths:
    with Image.open(p) as im:
      assert im.size[0] > 400 and im.size[1] > 200
  # An explicit --data_dir without a dataset fails loudly.
  with pytest.raises(FileNotFoundError, match="no converted dataset"):
    figures.main(["--workdir", workdir, "--data_dir", str(tmp_path / "none"),
                  "--out", str(tmp_path / "nodata")])


def test_cli_without_dataset_names_what_it_skipped(tiny_run, tmp_path, monkeypatch, capsys):
  from v1t_jax import dataset_meta
  _, workdir = tiny_run
  monkeypatch.setattr(dataset_meta, "available_mice", lambda data_dir: [])   # config's path gone
  out = str(tmp_path / "nodata")
  paths = figures.main(["--workdir", workdir, "--out", out])
  assert sorted(os.path.basename(p) for p in paths) == ["readout_positions.png",
                                                        "training_curves.png"]
  mice = ["90001-1-1", "90002-2-3", "90003-4-5"]
  expected = sorted(os.path.join(out, f"{kind}_{m}.png") for kind in ("rollout", "responses")
                    for m in mice)
  assert sorted(paths.skipped) == expected
  err = capsys.readouterr().err
  for path in expected:   # one stderr line each, with the reason
    (line,) = [x for x in err.splitlines() if path in x]
    assert "no converted dataset" in line
  assert "skipped 6" in err


def test_trained_run_response_figure_has_model_and_oracle_distributions(tiny_run, tiny_zips):
  from v1t_jax import predict
  config, workdir = tiny_run
  predictor = predict.Predictor.from_workdir(workdir)
  predictor.config.synthetic.zip_dir = os.path.dirname(tiny_zips[0])
  mice = figures.dataset_mice(predictor, config.data.data_dir)
  tiers = figures.collect_tier(predictor, mice, "validation", 1,
                               figures.synthetic_truth(predictor.config, mice))
  figs = figures.tier_figures(tiers, "validation", 2)
  for t in tiers:
    assert t.oracle is not None and t.oracle.shape == t.recorded.shape
    (dist,) = [ax for ax in figs[f"responses/{t.name}"].axes
               if ax.get_title() == figures.DISTRIBUTION_TITLE]
    model_line, oracle_line = [line for line in dist.lines if len(line.get_xdata()) > 2]
    active = t.recorded.std(0) > figures.SILENT_STD
    for line, source in ((model_line, t.predicted), (oracle_line, t.oracle)):
      r = numpy_correlations(np.float64(source), np.float64(t.recorded))[active]
      np.testing.assert_allclose(line.get_xdata(), np.sort(r), atol=1e-4)


def test_synthetic_truth_of_the_tiny_preset(tiny_zips, tiny_data_dir):
  from v1t_jax import dataset_meta
  config = synthetic.get_config("tiny")
  config.synthetic.zip_dir = os.path.dirname(tiny_zips[0])
  mice = dataset_meta.resolve_mice(tiny_data_dir)
  truth = figures.synthetic_truth(config, mice)
  assert sorted(truth) == sorted(m.name for m in mice)
  for meta in mice:
    assert truth[meta.name].shape[1] == meta.num_neurons
  config.synthetic.zip_dir = "/nonexistent"
  assert figures.synthetic_truth(config, mice) == {}


def test_summary_images_of_a_training_state(tiny_run):
  from v1t_jax import checkpoints, train
  config, workdir = tiny_run
  trainer = train.setup(config)
  _, best = checkpoints.checkpoint_managers(workdir)
  state, _ = checkpoints.restore(best, trainer)
  best.close()
  images = figures.summary_images(trainer, state, step=3, prefix="again/", num_images=1,
                                  num_neurons=2)
  expected = sorted([f"{kind}/{m}" for kind in ("rollout", "responses")
                     for m in ("90001-1-1", "90002-2-3", "90003-4-5")] + ["readout_positions"])
  assert sorted(images) == ["again/" + t for t in expected]
  # Training wrote the same figures of its best state to TensorBoard (train.write_figures).
  import tensorflow as tf
  tags = {v.tag for f in os.listdir(workdir) if f.startswith("events.out")
          for e in tf.compat.v1.train.summary_iterator(os.path.join(workdir, f))
          for v in e.summary.value}
  assert {"best/" + t for t in expected} <= tags
  for array in images.values():
    assert array.dtype == np.uint8 and array.ndim == 4 and array.shape[0] == 1
    assert array.shape[-1] == 3
  # clu's writer takes them as they are (the hook in train.py).
  from clu import metric_writers
  writer = metric_writers.create_default_writer(workdir)
  writer.write_images(3, images)
  writer.flush()
  assert "train/loss" in figures.read_scalars(workdir)   # image summaries are skipped
