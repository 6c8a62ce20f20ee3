r"""One-time conversion of Sensorium / Franke mice into TFRecord shards (one tfds dataset per mouse).

  python -m data_prep.convert --src data/sensorium_zips --data_dir data/sensorium_tfds
  python -m data_prep.convert --src a.zip,b.zip,unzipped_folder/ --data_dir data/tfds

`--src` takes zips (read in place, no unzip needed), unzipped mouse folders, or folders holding
several `static*` zips / folders. Each mouse goes to `<data_dir>/sensorium_mouse/<data_key>/1.0.0`.

Idempotent: a mouse whose dataset is complete and was made from a source with the same sha256 is
skipped. A complete dataset from a *different* source is an error unless `--overwrite`. Atomic:
every file of a mouse is validated before anything is written, and tfds writes into a temporary
folder that is renamed into place only when complete (leftovers of a killed run are removed).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow_datasets as tfds  # noqa: E402  (after the TF log settings)

from data_prep.sensorium_source import MouseSource, SourceError, read_mouse  # noqa: E402
from data_prep.tfds_builder import SensoriumMouse  # noqa: E402
from v1t_jax import dataset_meta  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Converted:
  data_key: str
  path: str
  trials: int
  seconds: float
  skipped: bool


def expand_sources(paths: list[str]) -> list[str]:
  """Mouse zips and folders; a folder without data/ is searched for static* zips and folders."""
  out = []
  for p in paths:
    if os.path.isdir(p) and not os.path.isdir(os.path.join(p, "data")):
      inner = sorted(os.path.join(p, c) for c in os.listdir(p)
                     if c.startswith("static") and (c.endswith(".zip") or
                                                    os.path.isdir(os.path.join(p, c, "data"))))
      if not inner:
        raise SourceError(f"{p}: no static*.zip files or mouse folders in this folder")
      # A zip and its unzipped folder side by side are one mouse: keep the folder.
      stems = {c for c in inner if not c.endswith(".zip")}
      out += [c for c in inner if not (c.endswith(".zip") and c[:-4] in stems)]
    else:
      out.append(p)
  return out


def remove_leftovers(data_dir: str, data_key: str):
  """Temporary folders of an interrupted run (tfds names them incomplete.*)."""
  parent = os.path.dirname(dataset_meta.mouse_dir(data_dir, data_key))
  if os.path.isdir(parent):
    for name in os.listdir(parent):
      if name.startswith("incomplete."):
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def convert_one(path: str, data_dir: str, overwrite: bool = False) -> Converted:
  t0 = time.time()
  with MouseSource(path) as src:
    key = src.data_key
    out = dataset_meta.mouse_dir(data_dir, key)
    checksum = src.checksum()
    if dataset_meta.is_complete(out):
      done = dataset_meta.load_mouse_dir(out)
      if done.info.get("source_sha256") == checksum:
        return Converted(key, out, done.info["num_trials"], time.time() - t0, skipped=True)
      if not overwrite:
        raise SourceError(
            f"{path}: {out} already holds mouse {key} converted from a different source "
            f"({done.info.get('source_name')}, sha256 {done.info.get('source_sha256', '?')[:12]}...)"
            "; pass --overwrite to replace it")
    remove_leftovers(data_dir, key)
    print(f"{key}: reading and validating {os.path.basename(path)}", flush=True)
    mouse = read_mouse(src)
  print(f"{key}: writing {mouse.num_trials} trials x {mouse.num_neurons} neurons", flush=True)
  builder = SensoriumMouse(mouse=mouse, checksum=checksum, data_dir=data_dir)
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, download_mode=mode))
  finally:
    remove_leftovers(data_dir, key)
  return Converted(key, out, mouse.num_trials, time.time() - t0, skipped=False)


def convert(sources: list[str], data_dir: str, overwrite: bool = False) -> list[Converted]:
  paths = expand_sources(sources)
  results = []
  for i, path in enumerate(paths):
    r = convert_one(path, data_dir, overwrite)
    results.append(r)
    if r.skipped:
      print(f"[{i + 1}/{len(paths)}] {r.data_key}: already converted from this source, skipped",
            flush=True)
    else:
      print(f"[{i + 1}/{len(paths)}] {r.data_key}: {r.trials} trials in {r.seconds:.1f} s "
            f"({r.trials / max(r.seconds, 1e-9):.0f} trials/s) -> {r.path}", flush=True)
  return results


_SRC = flags.DEFINE_list("src", None, "zips, mouse folders, or folders of static* zips", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "output folder for the datasets", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace mice converted from another source")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # progress is printed per mouse; tfds's INFO is noise
  tfds.disable_progress_bar()
  try:
    convert(_SRC.value, _DATA_DIR.value, _OVERWRITE.value)
  except SourceError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
