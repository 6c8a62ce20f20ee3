r"""Sensorium 2022 submission files, ground-truth files and an offline scorer.

  python -m v1t_jax.submission --workdir runs/v1t --data_dir data/sensorium_tfds [--out DIR]
  python -m v1t_jax.submission truth --data_dir data/synthetic_demo_tfds --out DIR \
      [--truth_zips data/synthetic_demo_zips]
  python -m v1t_jax.submission score --submission S.csv --ground_truth G.csv

`write` (the default) restores the run's best checkpoint and writes, for every competition mouse
(a mouse with a `final_test` tier, like S0 / S1) among its mice, the challenge's two files
`<out>/<data_key>/submission_file_live_test.csv` (tier `test`) and
`<out>/<data_key>/submission_file_final_test.csv`; `--mice` picks other mice (their `test` tier).
The challenge takes one mouse per submission (sinzlab `generate_submission_file`), hence a folder
per mouse. The format is the challenge's (`sensorium_format.md` §7): columns `trial_indices,
image_ids, prediction, neuron_ids`, no index column, one row per trial of the tier in file order,
`trial_indices` the `trial_idx` value (int, or the 32-hex string of the competition mice, kept
verbatim), `prediction` and `neuron_ids` Python list literals (float32 predictions written with
Python's repr of the float, as pandas writes `array.tolist()`), in standardised response units.

`truth` writes `ground_truth_file_<tier>.csv` (column `responses` instead of `prediction`: the
standardised recorded responses) for each mouse and tier whose responses are present; withheld
tiers of competition mice take the synthetic noise-free rates (`<zip stem>.truth.npz`, times the
response precision) when `--truth_zips` is given.

`score` prints one JSON line {"single_trial_correlation", "correlation_to_average", "feve"}
computed with `v1t_jax.metrics.TierMetrics`, the training-time evaluation's code, after aligning
the two files by trial id and neuron id as the official evaluator does. Malformed files (wrong
columns, missing or extra trials, other neuron ids, NaN, unparsable lists) fail with an error
naming the file and the problem.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from v1t_jax import dataset_meta, metrics

PREDICTION_COLUMNS = ("trial_indices", "image_ids", "prediction", "neuron_ids")
TRUTH_COLUMNS = ("trial_indices", "image_ids", "responses", "neuron_ids")
SUBMISSION_NAMES = {"test": "submission_file_live_test.csv",
                    "final_test": "submission_file_final_test.csv"}
COMPETITION_TIERS = ("test", "final_test")


class CsvError(ValueError):
  """A submission or ground-truth file that cannot be scored; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Writing.


def list_literal(values) -> str:
  """`str(list)` of the values as Python numbers: what pandas writes for a list cell."""
  return "[" + ", ".join(repr(v) for v in np.asarray(values).tolist()) + "]"


def write_csv(path: str, columns: Sequence[str], trial_ids, image_ids, values_TxN, neuron_ids):
  """One row per trial, list columns as literals; written to a temporary name, then renamed."""
  values_TxN = np.asarray(values_TxN)
  if not (len(trial_ids) == len(image_ids) == len(values_TxN)):
    raise ValueError(f"{path}: {len(trial_ids)} trial ids, {len(image_ids)} image ids and "
                     f"{len(values_TxN)} rows of values")
  if values_TxN.ndim != 2 or values_TxN.shape[1] != len(neuron_ids):
    raise ValueError(f"{path}: values must be [trials, {len(neuron_ids)} neurons], got "
                     f"{list(values_TxN.shape)}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  neurons = list_literal(np.asarray(neuron_ids, np.int64))
  tmp = path + ".partial"
  with open(tmp, "w", newline="") as f:
    # pandas' to_csv: QUOTE_MINIMAL (the list cells hold commas, so they are quoted), "\n".
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns)
    for trial, image, row in zip(trial_ids, image_ids, values_TxN):
      writer.writerow([str(trial), str(int(image)), list_literal(row), neurons])
  os.replace(tmp, path)
  return path


def tier_file_rows(meta: dataset_meta.MouseMeta, tier: str):
  """File numbers, trial ids and image ids of a tier, from the dataset's tables (no TF)."""
  rows = np.flatnonzero(meta.trial_array("tiers") == tier)
  trial_idx = meta.trial_array("trial_idx")[rows]
  image_ids = meta.trial_array(meta.info.get("image_id_field", "frame_image_id"))[rows]
  return rows, [str(t) for t in trial_idx.tolist()], np.asarray(image_ids, np.int64)


def read_tier(meta: dataset_meta.MouseMeta, tier: str, data_cfg) -> dict[str, np.ndarray]:
  """Every trial of one mouse's tier through the input pipeline (normalised as in training), in
  file order, checked against the dataset's tables; plus `trial_ids` (trial_idx as strings)."""
  from v1t_jax import input_pipeline   # TensorFlow only where data is read
  ds, _ = input_pipeline.eval_dataset([meta], tier, data_cfg, process_index=0, process_count=1)
  parts = []
  for batch in input_pipeline.as_numpy(ds):
    valid = batch["valid"][0]
    parts.append({k: np.asarray(v[0])[valid] for k, v in batch.items()})
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  rows, trial_ids, image_ids = tier_file_rows(meta, tier)
  if not (np.array_equal(out["trial"], rows) and np.array_equal(out["image_id"], image_ids)):
    raise RuntimeError(f"{meta.path}: the {tier} records are not the tier's trials in file order "
                       f"(expected trials {rows[:5].tolist()}..., "
                       f"read {out['trial'][:5].tolist()}...)")
  out["responses"] = out["responses"][:, : meta.num_neurons]
  out["trial_ids"] = trial_ids
  return out


def data_config(predictor, data_dir: str, batch_size: int):
  """The run's data settings (crop, resize, grey scale) on another data_dir."""
  cfg = predictor.config.data.copy_and_resolve_references()
  cfg.data_dir = data_dir
  cfg.eval_batch_size = batch_size
  return cfg


def check_same_mouse(predictor, meta: dataset_meta.MouseMeta):
  """The data_dir's mouse must be the one the checkpoint was trained on (ids and statistics)."""
  record = predictor.mouse(meta.data_key)
  if not np.array_equal(record.unit_ids, np.asarray(meta.unit_ids, np.int64)):
    raise ValueError(f"{meta.path}: mouse {meta.data_key} has other neuron ids than in the "
                     f"checkpoint {predictor.path} (another release of the data?)")
  saved = predictor.run["mice"][record.index]["normalisation"]
  here = dataset_meta.checkpoint_record(meta)["normalisation"]
  for key, value in saved.items():
    if not np.allclose(value, here[key], rtol=1e-6, atol=0):
      raise ValueError(f"{meta.path}: mouse {meta.data_key}'s statistics ({key}) differ from those "
                       f"recorded in the checkpoint {predictor.path}")


def competition_mice(predictor, data_dir: str, names: Sequence[str] | None = None):
  """MouseMeta of the requested mice, else of the checkpoint's mice with a final_test tier."""
  if names:
    keys = [predictor.mouse(n).data_key for n in names]
  else:
    available = set(dataset_meta.available_mice(data_dir))
    keys = [r.data_key for r in predictor.records if r.data_key in available]
    keys = [k for k in keys if dataset_meta.load_mouse_dir(
        dataset_meta.mouse_dir(data_dir, k)).tier_size("final_test")]
    if not keys:
      raise ValueError(f"no competition mouse (one with a final_test tier) among the checkpoint's "
                       f"mice {predictor.mice} in {data_dir}; name mice with --mice")
  return dataset_meta.resolve_mice(data_dir, tuple(keys))


def write_submission(predictor, data_dir: str, out_dir: str, mice: Sequence[str] | None = None,
                     batch_size: int = 64) -> dict[str, dict[str, str]]:
  """The challenge's CSVs per mouse: {data_key: {tier: path}} for the tiers the mouse has."""
  cfg = data_config(predictor, data_dir, batch_size)
  written = {}
  for meta in competition_mice(predictor, data_dir, mice):
    check_same_mouse(predictor, meta)
    record = predictor.mouse(meta.data_key)
    written[meta.data_key] = {}
    for tier in COMPETITION_TIERS:
      if not meta.tier_size(tier):
        continue
      trials = read_tier(meta, tier, cfg)
      pred = predictor.predict_model_inputs(record.name, trials["image"], trials["behavior"],
                                            trials["pupil_center"], batch_size=batch_size)
      path = os.path.join(out_dir, meta.data_key, SUBMISSION_NAMES[tier])
      write_csv(path, PREDICTION_COLUMNS, trials["trial_ids"], trials["image_id"], pred,
                record.unit_ids)
      written[meta.data_key][tier] = path
  return written


def withheld(meta: dataset_meta.MouseMeta, tier: str) -> bool:
  """Competition mice (hashed trial ids) have zeroed test / final_test responses (§4)."""
  return bool(meta.info.get("trial_idx_hashed")) and tier in COMPETITION_TIERS


def synthetic_truth(meta: dataset_meta.MouseMeta, truth_zips: str) -> np.ndarray:
  """Standardised noise-free rates [trials, n] of a synthetic mouse (file order)."""
  path = os.path.join(truth_zips, meta.info["source_name"][: -len(".zip")] + ".truth.npz")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no synthetic ground truth for mouse {meta.data_key}")
  with np.load(path) as z:
    rates = z["rates"]
  return rates * dataset_meta.normalisation(meta).response_precision


def write_ground_truth(data_dir: str, out_dir: str, mice: Sequence[str] = (),
                       tiers: Sequence[str] = COMPETITION_TIERS, truth_zips: str | None = None,
                       batch_size: int = 64) -> dict[str, dict[str, str]]:
  """`ground_truth_file_<tier>.csv` per mouse and tier with responses (or synthetic truth)."""
  from configs import default   # the pipeline settings of every config (36x64, no crop)
  cfg = default.data_config()
  cfg.data_dir, cfg.eval_batch_size = data_dir, batch_size
  written = {}
  for meta in dataset_meta.resolve_mice(data_dir, tuple(mice)):
    for tier in tiers:
      if not meta.tier_size(tier):
        continue
      if withheld(meta, tier) and truth_zips is None:
        print(f"{meta.data_key} {tier}: responses withheld, skipped (--truth_zips gives the "
              "synthetic truth)", file=sys.stderr)
        continue
      trials = read_tier(meta, tier, cfg)
      responses = trials["responses"]
      if withheld(meta, tier):
        responses = synthetic_truth(meta, truth_zips)[trials["trial"]]
      path = os.path.join(out_dir, meta.data_key, f"ground_truth_file_{tier}.csv")
      write_csv(path, TRUTH_COLUMNS, trials["trial_ids"], trials["image_id"], responses,
                meta.unit_ids)
      written.setdefault(meta.data_key, {})[tier] = path
  return written


# ---------------------------------------------------------------------------------------------
# Reading and scoring.


@dataclasses.dataclass
class Table:
  """A parsed submission or ground-truth file."""
  path: str
  trial_ids: list[str]
  image_ids: np.ndarray    # [T] int64
  values: np.ndarray       # [T, N] float64
  neuron_ids: np.ndarray   # [N] int64


def _parse_list(text: str, path: str, row: int, column: str, dtype) -> np.ndarray:
  s = text.strip()
  if not (s.startswith("[") and s.endswith("]")) or not s[1:-1].strip():
    raise CsvError(f"{path}: row {row}, column {column}: expected a non-empty list literal "
                   f"'[...]', got {s[:40]!r}")
  try:
    values = np.array(s[1:-1].split(","), dtype=np.float64)
  except ValueError as e:
    raise CsvError(f"{path}: row {row}, column {column}: not a list of numbers ({e})") from None
  if not np.all(np.isfinite(values)):
    bad = np.flatnonzero(~np.isfinite(values))
    raise CsvError(f"{path}: row {row}, column {column}: {bad.size} NaN or inf values "
                   f"(positions {bad[:5].tolist()})")
  if dtype is np.int64:
    if not np.all(values == np.round(values)):
      raise CsvError(f"{path}: row {row}, column {column}: neuron ids must be integers")
    return values.astype(np.int64)
  return values


def read_table(path: str, value_column: str) -> Table:
  """Parse and validate a submission (`prediction`) or ground-truth (`responses`) CSV."""
  expected = ("trial_indices", "image_ids", value_column, "neuron_ids")
  if not os.path.isfile(path):
    raise CsvError(f"{path}: no such file")
  csv.field_size_limit(2**31 - 1)   # one list cell of ~8000 floats exceeds the 128 KiB default
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise CsvError(f"{path}: empty file (expected the header {','.join(expected)})")
    header = [h.strip() for h in header]
    if sorted(header) != sorted(expected):
      missing = [c for c in expected if c not in header]
      extra = [c for c in header if c not in expected]
      raise CsvError(f"{path}: wrong columns {header}: expected {list(expected)}"
                     + (f"; missing {missing}" if missing else "")
                     + (f"; unexpected {extra}" if extra else ""))
    col = {name: header.index(name) for name in expected}
    trial_ids, image_ids, values = [], [], []
    neuron_text, neuron_ids = None, None
    for row, fields in enumerate(reader, start=1):
      if not fields:
        continue
      if len(fields) != len(header):
        raise CsvError(f"{path}: row {row} has {len(fields)} fields, expected {len(header)}")
      trial = fields[col["trial_indices"]].strip()
      if not trial:
        raise CsvError(f"{path}: row {row}: empty trial_indices")
      try:
        image_ids.append(int(fields[col["image_ids"]]))
      except ValueError:
        raise CsvError(f"{path}: row {row}: image_ids {fields[col['image_ids']]!r} is not an "
                       "integer") from None
      text = fields[col["neuron_ids"]]
      if neuron_text is None:
        neuron_text = text
        neuron_ids = _parse_list(text, path, row, "neuron_ids", np.int64)
      elif text != neuron_text and not np.array_equal(
          _parse_list(text, path, row, "neuron_ids", np.int64), neuron_ids):
        raise CsvError(f"{path}: row {row}: neuron_ids differ from those of row 1 (every row "
                       "must list the same neurons)")
      v = _parse_list(fields[col[value_column]], path, row, value_column, np.float64)
      if v.size != neuron_ids.size:
        raise CsvError(f"{path}: row {row}: {v.size} values in {value_column}, but "
                       f"{neuron_ids.size} neuron_ids")
      trial_ids.append(trial)
      values.append(v)
  if not trial_ids:
    raise CsvError(f"{path}: no rows after the header")
  _no_duplicates(path, "trial_indices", trial_ids)
  _no_duplicates(path, "neuron_ids", neuron_ids.tolist())
  return Table(path, trial_ids, np.asarray(image_ids, np.int64), np.stack(values), neuron_ids)


def _no_duplicates(path: str, column: str, ids: list):
  seen, dup = set(), []
  for i in ids:
    if i in seen:
      dup.append(i)
    seen.add(i)
  if dup:
    raise CsvError(f"{path}: {len(dup)} duplicated {column} (e.g. {dup[:3]})")


def _sample(ids, k: int = 3) -> str:
  ids = sorted(ids)
  return ", ".join(map(str, ids[:k])) + (", ..." if len(ids) > k else "")


def _same_ids(submission: Table, truth: Table, what: str, got: set, want: set):
  if got != want:
    missing, extra = want - got, got - want
    raise CsvError(f"{submission.path}: {what} differ from the ground truth {truth.path}: "
                   + (f"{len(missing)} missing ({_sample(missing)})" if missing else "")
                   + ("; " if missing and extra else "")
                   + (f"{len(extra)} not in the ground truth ({_sample(extra)})" if extra else ""))


def align(submission: Table, truth: Table) -> np.ndarray:
  """The submission's values in the ground truth's trial and neuron order [T, N]; the same trials
  and neurons are required (the official evaluator's check), and the same image per trial."""
  _same_ids(submission, truth, "trials", set(submission.trial_ids), set(truth.trial_ids))
  _same_ids(submission, truth, "neuron_ids", set(submission.neuron_ids.tolist()),
            set(truth.neuron_ids.tolist()))
  row = {t: i for i, t in enumerate(submission.trial_ids)}
  order = np.array([row[t] for t in truth.trial_ids])
  column = {n: j for j, n in enumerate(submission.neuron_ids.tolist())}
  neurons = np.array([column[n] for n in truth.neuron_ids.tolist()])
  wrong = np.flatnonzero(submission.image_ids[order] != truth.image_ids)
  if wrong.size:
    t = truth.trial_ids[wrong[0]]
    raise CsvError(f"{submission.path}: {wrong.size} trials have another image id than in the "
                   f"ground truth {truth.path} (trial {t}: {submission.image_ids[order][wrong[0]]} "
                   f"vs {truth.image_ids[wrong[0]]})")
  return submission.values[order][:, neurons]


def score_tables(submission: Table, truth: Table) -> dict[str, float | None]:
  """The challenge's three metrics with the training-time evaluation's TierMetrics."""
  pred = align(submission, truth)
  tier = metrics.TierMetrics(truth.values.shape[1])
  tier.add(pred, truth.values, truth.image_ids, np.ones(len(pred), bool))
  result = tier.result()
  # NaN (FEVE without repeats, or no neuron above the FEV threshold) -> null: strict JSON.
  return {k: (float(v) if np.isfinite(v) else None) for k, v in result.items()}


def score(submission_path: str, ground_truth_path: str) -> dict[str, float | None]:
  return score_tables(read_table(submission_path, "prediction"),
                      read_table(ground_truth_path, "responses"))


# ---------------------------------------------------------------------------------------------
# Command line.


def _write_main(argv):
  p = argparse.ArgumentParser(
      prog="python -m v1t_jax.submission [write]",
      description="challenge submission CSVs from a run's checkpoint",
      epilog="other commands: `python -m v1t_jax.submission truth --help` (ground-truth CSVs) "
             "and `python -m v1t_jax.submission score --help` (score a submission offline)")
  p.add_argument("--workdir", required=True, help="run directory of launch_train.py")
  p.add_argument("--data_dir", required=True, help="converted dataset (data_prep.convert)")
  p.add_argument("--out", default=None, help="output folder (default: <workdir>/submission)")
  p.add_argument("--mice", nargs="*", default=None,
                 help="mice by name or data key (default: the competition mice)")
  p.add_argument("--which", default="best", choices=["best", "latest"])
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=64)
  args = p.parse_args(argv)
  from v1t_jax.predict import Predictor
  predictor = Predictor.from_workdir(args.workdir, which=args.which, step=args.step)
  out = args.out or os.path.join(args.workdir, "submission")
  return write_submission(predictor, args.data_dir, out, args.mice, args.batch_size)


def _truth_main(argv):
  p = argparse.ArgumentParser(prog="python -m v1t_jax.submission truth",
                              description="ground-truth CSVs of the tiers with responses")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--mice", nargs="*", default=())
  p.add_argument("--tiers", nargs="*", default=list(COMPETITION_TIERS))
  p.add_argument("--truth_zips", default=None,
                 help="folder of synthetic zips with <stem>.truth.npz (truth of withheld tiers)")
  args = p.parse_args(argv)
  return write_ground_truth(args.data_dir, args.out, args.mice, args.tiers, args.truth_zips)


def _score_main(argv):
  p = argparse.ArgumentParser(prog="python -m v1t_jax.submission score",
                              description="score a submission CSV against a ground-truth CSV")
  p.add_argument("--submission", required=True)
  p.add_argument("--ground_truth", required=True)
  args = p.parse_args(argv)
  return score(args.submission, args.ground_truth)


COMMANDS = {"write": _write_main, "truth": _truth_main, "score": _score_main}


def main(argv: Sequence[str] | None = None):
  argv = list(sys.argv[1:] if argv is None else argv)
  command = argv.pop(0) if argv and argv[0] in COMMANDS else "write"
  result = COMMANDS[command](argv)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
