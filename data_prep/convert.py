r"""One-time conversion of Sensorium / Franke mice into TFRecord shards (one tfds dataset per mouse).

  python -m data_prep.convert --src data/sensorium_zips --data_dir data/sensorium_tfds
  python -m data_prep.convert --src a.zip,b.zip,unzipped_folder/ --data_dir data/tfds
  python -m data_prep.convert --src data/*.zip --data_dir data/tfds

`--src` takes several paths, separated by commas or spaces (a shell glob expands into spaces; a
quoted glob is expanded here). The last line says how many mice were found, converted and skipped.

It takes zips (read in place, no unzip needed), unzipped mouse folders, or folders holding
several `static*` zips / folders. Each mouse goes to `<data_dir>/sensorium_mouse/<data_key>/1.0.0`.

Idempotent: a mouse whose dataset is complete and was made from a source with the same sha256 is
skipped. A complete dataset from a *different* source is an error unless `--overwrite`. Atomic:
every file of a mouse is validated before anything is written, and tfds writes into a temporary
folder that is renamed into place only when complete (leftovers of a killed run are removed).
`--overwrite` writes the new mouse beside the old one and swaps them once it is complete.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import sys
import time

from absl import flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow_datasets as tfds  # noqa: E402  (after the TF log settings)

from data_prep import prepare  # noqa: E402
from data_prep.sensorium_source import MouseSource, SourceError, read_mouse  # noqa: E402
from data_prep.tfds_builder import SensoriumMouse  # noqa: E402
from v1t_jax import cli, dataset_meta  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Converted:
  data_key: str
  path: str
  trials: int
  seconds: float
  skipped: bool
  neurons: int = 0   # of a converted mouse (0 when skipped)


def expand_sources(paths: list[str]) -> list[str]:
  """Mouse zips and folders; a folder without data/ is searched for static* zips and folders."""
  out = []
  for p in paths:
    if not os.path.exists(p) and any(c in p for c in "*?["):   # a glob the shell left as is
      matches = sorted(glob.glob(p))
      if not matches:
        raise SourceError(f"--src {p}: no file or folder matches this pattern")
      out += expand_sources(matches)
      continue
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


_NEW = "overwrite.new"   # beside a mouse's version folder: the replacement being written
_OLD = ".old"            # suffix of the replaced version folder, between the two renames


def remove_leftovers(data_dir: str, data_key: str):
  """Temporary folders of an interrupted run: tfds's incomplete.*, an unfinished replacement
  (--overwrite), and the replaced mouse (put back if the run died between the two renames)."""
  out = dataset_meta.mouse_dir(data_dir, data_key)
  parent = os.path.dirname(out)
  if not os.path.isdir(parent):
    return
  for name in os.listdir(parent):
    if name.startswith("incomplete.") or name == _NEW:
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
  if os.path.isdir(out + _OLD):
    if dataset_meta.is_complete(out):
      shutil.rmtree(out + _OLD, ignore_errors=True)
    else:
      shutil.rmtree(out, ignore_errors=True)
      os.rename(out + _OLD, out)


def write_mouse(mouse, checksum: str, data_dir: str, replace: bool):
  """Writes the tfds dataset of a mouse; `replace`: beside the complete one, then swapped in, so
  the old mouse stays whole until the new one is."""
  out = dataset_meta.mouse_dir(data_dir, mouse.data_key)
  root = os.path.join(os.path.dirname(out), _NEW) if replace else data_dir
  builder = SensoriumMouse(mouse=mouse, checksum=checksum, data_dir=root)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  if replace:
    os.rename(out, out + _OLD)
    os.rename(dataset_meta.mouse_dir(root, mouse.data_key), out)
    shutil.rmtree(out + _OLD)


def convert_one(path: str, data_dir: str, overwrite: bool = False) -> Converted:
  t0 = time.time()
  with MouseSource(path) as src:
    key = src.data_key
    out = dataset_meta.mouse_dir(data_dir, key)
    remove_leftovers(data_dir, key)   # first: it may put back the mouse a killed run replaced
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
    mouse = read_mouse(src)
  try:
    write_mouse(mouse, checksum, data_dir, replace=dataset_meta.is_complete(out))
  finally:
    remove_leftovers(data_dir, key)
  return Converted(key, out, mouse.num_trials, time.time() - t0, skipped=False,
                   neurons=mouse.num_neurons)


def convert(sources: list[str], data_dir: str, overwrite: bool = False) -> list[Converted]:
  paths = expand_sources(sources)
  prepare.writable_dir(data_dir, "--data_dir")
  tfds.disable_progress_bar()   # tqdm bars of tfds's writer; we print one line per mouse
  results = []
  for i, path in enumerate(paths):
    r = convert_one(path, data_dir, overwrite)
    results.append(r)
    if r.skipped:
      print(f"[{i + 1}/{len(paths)}] {r.data_key}: already converted from this source, skipped",
            flush=True)
    else:
      print(f"[{i + 1}/{len(paths)}] {r.data_key}: {r.trials} trials x {r.neurons} neurons "
            f"from {os.path.basename(path)} in {r.seconds:.1f} s "
            f"({r.trials / max(r.seconds, 1e-9):.0f} trials/s) -> {r.path}", flush=True)
  skipped = sum(r.skipped for r in results)
  print(f"{len(paths)} {'mouse' if len(paths) == 1 else 'mice'} found: "
        f"{len(paths) - skipped} converted, {skipped} skipped "
        f"(already converted) -> {data_dir}", flush=True)
  return results


_SRC = flags.DEFINE_list("src", None, "zips, mouse folders, or folders of static* zips; "
                        "several paths separated by commas or spaces (--src data/*.zip)",
                        required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "output folder for the datasets", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace mice converted from another source")


def gather_src(argv: list[str]) -> list[str]:
  """argv with the paths that follow `--src X` / `--src=X` joined into its comma list.

  `--src data/*.zip` reaches us as `--src a.zip b.zip c.zip` (the shell expands the glob), which
  absl would read as `--src a.zip` plus positional arguments. Every argument up to the next
  `-...` is one more path; anything else positional stays a usage error.
  """
  out, i = list(argv[:1]), 1
  while i < len(argv):
    arg = argv[i]
    i += 1
    if arg in ("--src", "-src") and i < len(argv):
      arg, i = f"--src={argv[i]}", i + 1
    if arg.startswith(("--src=", "-src=")):
      paths = [arg.split("=", 1)[1]]
      while i < len(argv) and not argv[i].startswith("-"):
        paths.append(argv[i])
        i += 1
      arg = "--src=" + ",".join(p for p in paths if p)
    out.append(arg)
  return out


def main(argv):
  cli.no_positional(argv)
  logging.set_verbosity(logging.WARNING)   # progress is printed per mouse; tfds's INFO is noise
  try:
    convert(_SRC.value, _DATA_DIR.value, _OVERWRITE.value)
  except (SourceError, prepare.DataDirError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main, flags_parser=lambda argv: cli.parse_flags(gather_src(argv)))
