"""Submission and ground-truth CSVs in the challenge's format; the offline scorer; bad files."""

import csv
import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from test_predict import MICE, make_tiny_run, zip_trials   # the shared tiny checkpoint
from v1t_jax import dataset_meta, predict, submission

HEADER = "trial_indices,image_ids,prediction,neuron_ids"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data_dir):
  return make_tiny_run(tmp_path_factory, tiny_data_dir)[0]


@pytest.fixture(scope="module")
def files(run, tiny_zips, tiny_data_dir, tmp_path_factory):
  """The submission of the tiny run and the ground truth of every tiny mouse (synthetic truth for
  the withheld tiers), both written through the command line."""
  out = tmp_path_factory.mktemp("submission")
  submission.main(["--workdir", run, "--data_dir", tiny_data_dir, "--out", str(out / "sub"),
                   "--batch_size", "8"])
  submission.main(["truth", "--data_dir", tiny_data_dir, "--out", str(out / "truth"),
                   "--truth_zips", os.path.dirname(tiny_zips[0])])
  return out


def source_zip(zips, meta):
  return next(z for z in zips if os.path.basename(z) == meta.info["source_name"])


def zip_array(zips, meta, name):
  """meta/... or data/... array of the mouse's source zip."""
  path = source_zip(zips, meta)
  with zipfile.ZipFile(path) as z:
    return np.load(io.BytesIO(z.read(f"{os.path.basename(path)[:-4]}/{name}")))


def numpy_scores(pred, resp, image_ids):
  """The challenge's metrics written out directly (sensorium_format.md §7)."""
  def corr(a, b):
    za = (a - a.mean(0)) / (a.std(0) + 1e-8)
    zb = (b - b.mean(0)) / (b.std(0) + 1e-8)
    return (za * zb).mean(0)
  ids = np.unique(image_ids)
  per_image = lambda x: np.stack([x[image_ids == i].mean(0) for i in ids])   # noqa: E731
  noise = np.mean([resp[image_ids == i].var(0, ddof=1) for i in ids], axis=0)
  total = resp.var(0, ddof=1)
  fev = (total - noise) / total
  feve = 1 - (((resp - pred) ** 2).mean(0) - noise) / (total - noise)
  return {"single_trial_correlation": corr(pred, resp).mean(),
          "correlation_to_average": corr(per_image(pred), per_image(resp)).mean(),
          "feve": feve[fev >= 0.15].mean()}


def test_submission_files_have_the_challenge_format(files, run, tiny_zips, tiny_data_dir):
  # One folder per competition mouse (those with a final_test tier), two files each.
  assert sorted(os.listdir(files / "sub")) == MICE[:2]
  predictor = predict.Predictor.from_workdir(run)
  for meta in dataset_meta.resolve_mice(tiny_data_dir, tuple(MICE[:2])):
    assert sorted(os.listdir(files / "sub" / meta.data_key)) == [
        "submission_file_final_test.csv", "submission_file_live_test.csv"]
    tiers = zip_array(tiny_zips, meta, "meta/trials/tiers.npy")
    for tier, name in (("test", "live_test"), ("final_test", "final_test")):
      with open(files / "sub" / meta.data_key / f"submission_file_{name}.csv") as f:
        lines = f.read().split("\n")
      assert lines[0] == HEADER and lines[-1] == ""          # pandas' layout, no index column
      # Hashed trial ids unquoted and verbatim, list literals quoted (they hold commas).
      assert all(re.fullmatch(r'[0-9a-f]{32},\d+,"\[[^"]+\]","\[[\d, ]+\]"', line)
                 for line in lines[1:-1])
      table = submission.read_table(f.name, "prediction")
      rows = np.flatnonzero(tiers == tier)                   # file order of the tier
      trial_idx = zip_array(tiny_zips, meta, "meta/trials/trial_idx.npy")
      assert table.trial_ids == trial_idx[rows].tolist()
      np.testing.assert_array_equal(
          table.image_ids, zip_array(tiny_zips, meta, "meta/trials/frame_image_id.npy")[rows])
      np.testing.assert_array_equal(table.neuron_ids, meta.unit_ids)
      images, behavior, pupil = zip_trials(tiny_zips, meta, rows)
      np.testing.assert_allclose(
          table.values, predictor.predict(meta.name, images, behavior, pupil), rtol=1e-5, atol=1e-6)


def test_ground_truth_files(files, tiny_zips, tiny_data_dir):
  written = sorted(os.path.relpath(os.path.join(d, f), files / "truth")
                   for d, _, fs in os.walk(files / "truth") for f in fs)
  assert written == [f"{k}/ground_truth_file_{t}.csv" for k in MICE[:2]
                     for t in ("final_test", "test")] + [f"{MICE[2]}/ground_truth_file_test.csv"]
  recorded, competition = dataset_meta.resolve_mice(tiny_data_dir, (MICE[2], MICE[1]))
  # Recorded responses, standardised (raw x precision) as the evaluator's loader does.
  table = submission.read_table(str(files / "truth" / MICE[2] / "ground_truth_file_test.csv"),
                                "responses")
  rows = np.flatnonzero(zip_array(tiny_zips, recorded, "meta/trials/tiers.npy") == "test")
  raw = np.stack([zip_array(tiny_zips, recorded, f"data/responses/{i}.npy") for i in rows])
  precision = dataset_meta.normalisation(recorded).response_precision
  np.testing.assert_allclose(table.values, raw * precision, rtol=1e-6)
  # Withheld tiers: the noise-free synthetic rates.
  table = submission.read_table(
      str(files / "truth" / MICE[1] / "ground_truth_file_final_test.csv"), "responses")
  rows = np.flatnonzero(zip_array(tiny_zips, competition, "meta/trials/tiers.npy") == "final_test")
  rates = np.load(source_zip(tiny_zips, competition)[: -len(".zip")] + ".truth.npz")["rates"]
  precision = dataset_meta.normalisation(competition).response_precision
  np.testing.assert_allclose(table.values, rates[rows] * precision, rtol=1e-6)


def shuffled_copy(table, path, rng, values=None):
  """The table as a submission with its rows and neurons in another order."""
  rows, cols = rng.permutation(len(table.trial_ids)), rng.permutation(table.neuron_ids.size)
  values = table.values if values is None else values
  submission.write_csv(str(path), submission.PREDICTION_COLUMNS,
                       [table.trial_ids[i] for i in rows], table.image_ids[rows],
                       values[rows][:, cols], table.neuron_ids[cols])
  return str(path)


def test_scorer(files, tmp_path, capsys):
  rng = np.random.default_rng(0)
  truth_path = str(files / "truth" / MICE[2] / "ground_truth_file_test.csv")
  truth = submission.read_table(truth_path, "responses")
  # A perfect copy, rows and neurons reordered: the evaluator's formulas (its +1e-8 on each std
  # leaves nearly silent neurons of the recordings below 1, so compare with the direct formulas).
  perfect = submission.score(shuffled_copy(truth, tmp_path / "perfect.csv", rng), truth_path)
  assert perfect == pytest.approx(numpy_scores(truth.values, truth.values, truth.image_ids),
                                  rel=1e-8)
  # Noisy predictions of recorded responses: equal to the direct NumPy formulas (FEV filter on).
  noisy = truth.values + rng.normal(0, truth.values.std(0), truth.values.shape)
  got = submission.score(shuffled_copy(truth, tmp_path / "noisy.csv", rng, noisy), truth_path)
  want = numpy_scores(noisy, truth.values, truth.image_ids)
  assert got == pytest.approx(want, rel=1e-8)
  assert 0 < got["single_trial_correlation"] < 0.9

  # The model's submission against the synthetic truth of a withheld tier, through the CLI.
  sub = str(files / "sub" / MICE[1] / "submission_file_live_test.csv")
  truth_path = str(files / "truth" / MICE[1] / "ground_truth_file_test.csv")
  capsys.readouterr()
  submission.main(["score", "--submission", sub, "--ground_truth", truth_path])
  line = capsys.readouterr().out
  assert line.count("\n") == 1
  got = json.loads(line)
  assert list(got) == ["single_trial_correlation", "correlation_to_average", "feve"]
  pred = submission.read_table(sub, "prediction")
  truth = submission.read_table(truth_path, "responses")
  assert got == pytest.approx(numpy_scores(pred.values, truth.values, truth.image_ids), rel=1e-6)
  # A perfect prediction of the noise-free truth: correlations 1 (up to the +1e-8 on each std).
  # Its FEVE is not 1: behaviour and eye position change the rates between repeats, which the
  # metric counts as noise.
  perfect = submission.score(shuffled_copy(truth, tmp_path / "p2.csv", rng), truth_path)
  assert perfect["single_trial_correlation"] == pytest.approx(1.0, abs=1e-5)
  assert perfect["correlation_to_average"] == pytest.approx(1.0, abs=1e-5)
  assert perfect == pytest.approx(numpy_scores(truth.values, truth.values, truth.image_ids),
                                  rel=1e-8)


def edited(path, out, edit):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  rows = edit(rows) or rows
  with open(out, "w", newline="") as f:
    csv.writer(f, lineterminator="\n").writerows(rows)
  return str(out)


def set_cell(row, col, value):
  def edit(rows):
    rows[row][col] = value
  return edit


def nan_at(row):
  def edit(rows):
    values = rows[row][2][1:-1].split(", ")
    values[4] = "nan"
    rows[row][2] = "[" + ", ".join(values) + "]"
  return edit


def drop_value(rows):
  rows[2][2] = rows[2][2].rsplit(",", 1)[0] + "]"


def shift_ids(rows):
  for r in rows[1:]:
    r[3] = "[" + ", ".join(str(int(v) + 1000) for v in r[3][1:-1].split(",")) + "]"


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[:-1], r"trials differ from the ground truth .*: 1 missing"),
    (lambda rows: rows + [rows[1]], r"1 duplicated trial_indices"),
    (set_cell(1, 0, "deadbeef" * 4), r"1 missing .*; 1 not in the ground truth"),
    (shift_ids, r"neuron_ids differ from the ground truth .*: 31 missing .*; 31 not in the ground truth"),
    (set_cell(0, 2, "predictions"), r"wrong columns .* missing \['prediction'\]; "
                                    r"unexpected \['predictions'\]"),
    (nan_at(3), r"row 3, column prediction: 1 NaN or inf values \(positions \[4\]\)"),
    (drop_value, r"row 2: 30 values in prediction, but 31 neuron_ids"),
    (set_cell(2, 3, "[1, 2, 3]"), r"row 2: neuron_ids differ from those of row 1"),
    (set_cell(1, 2, "0.5"), r"row 1, column prediction: expected a non-empty list literal"),
    (set_cell(1, 1, "x"), r"row 1: image_ids 'x' is not an integer"),
    (set_cell(1, 1, "7"), r"1 trials have another image id"),
    (lambda rows: rows[:1], r"no rows after the header"),
])
def test_malformed_submissions_fail_clearly(files, tmp_path, edit, message):
  sub = str(files / "sub" / MICE[1] / "submission_file_live_test.csv")
  truth = str(files / "truth" / MICE[1] / "ground_truth_file_test.csv")
  bad = edited(sub, tmp_path / "bad.csv", edit)
  with pytest.raises(submission.CsvError, match=re.escape(bad) + ".*" + message):
    submission.score(bad, truth)


def test_scorer_cli_reports_errors(files, tmp_path):
  sub = str(files / "sub" / MICE[1] / "submission_file_live_test.csv")
  bad = edited(sub, tmp_path / "bad.csv", nan_at(1))
  result = subprocess.run(
      [sys.executable, "-m", "v1t_jax.submission", "score", "--submission", bad,
       "--ground_truth", str(files / "truth" / MICE[1] / "ground_truth_file_test.csv")],
      capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().endswith(f"error: {bad}: row 1, column prediction: 1 NaN or inf "
                                        "values (positions [4])")


def test_help_names_every_command():
  out = subprocess.run([sys.executable, "-m", "v1t_jax.submission", "--help"],
                       capture_output=True, text=True, timeout=60, check=True).stdout
  assert "submission truth --help" in out and "submission score --help" in out
