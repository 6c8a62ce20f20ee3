"""Makes sure the dataset a config names exists: synthesizes and converts the synthetic default.

A config with a `synthetic` section (configs/synthetic.py) describes data we can make here: the
preset's mice missing from `data.data_dir` (all of them on first use, the rest after a killed
conversion) are converted from the zips in `synthetic.zip_dir`, written there first when missing.
Real data must be converted by the user first (`python -m data_prep.convert`); a missing real
dataset is a clear error.
"""

from __future__ import annotations

import glob
import os
import tempfile

from v1t_jax import dataset_meta


class DataDirError(ValueError):
  """The data a config or flag names cannot be found or made: a folder that is missing, not a
  folder, not writable or without the mice asked for (one line for the user)."""


def writable_dir(path: str, what: str):
  """Creates folder `path` if needed and checks that a file can be written in it (a read-only
  file system or permissions); `what` names the flag in the error."""
  if "://" in path:   # gs:// and other remote folders: tfds reports on its own
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise DataDirError(f"{what}={path}: exists and is not a folder")
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test.")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    verb = "write in" if os.path.isdir(path) else "create"
    raise DataDirError(f"{what}={path}: cannot {verb} this folder ({e.strerror})") from None


def ensure_dataset(config) -> list[dataset_meta.MouseMeta]:
  """The config's mice, synthesizing + converting them first when the config says how.

  Raises DataDirError (one line for the user) when the data cannot be found or made.
  """
  data_dir = config.data.data_dir
  if "synthetic" in config:
    finish_synthetic(config.synthetic, data_dir)
  elif "://" not in data_dir and not os.path.isdir(data_dir):
    raise DataDirError(f"config.data.data_dir={data_dir}: no such folder; convert the data into "
                       f"it first: python -m data_prep.convert --src ZIPS --data_dir {data_dir}")
  try:
    return dataset_meta.resolve_mice(data_dir, tuple(config.data.mice))
  except (FileNotFoundError, ValueError) as e:   # its messages name the folder and the mice
    raise DataDirError(f"config.data: {e}") from None


def finish_synthetic(s, data_dir: str):
  """Converts every mouse of the preset missing from data_dir (a first use, or a conversion that
  was killed after some mice), synthesizing the zips first when one is missing."""
  from data_prep import synthesize   # NumPy only
  if s.preset not in synthesize.PRESETS:
    raise DataDirError(f"config.synthetic.preset={s.preset}: not one of "
                     f"{sorted(synthesize.PRESETS)}")
  done = set(dataset_meta.available_mice(data_dir))
  missing = [key for key, _ in synthesize.PRESETS[s.preset].mice if key not in done]
  if not missing:
    return

  def zips_of(keys):
    return {k: sorted(glob.glob(os.path.join(s.zip_dir, f"static{k}-*.zip"))) for k in keys}

  writable_dir(data_dir, "config.data.data_dir")
  if not all(zips_of(missing).values()):
    writable_dir(s.zip_dir, "config.synthetic.zip_dir")
    color = bool(s.get("color", False))
    print(f"synthesizing the '{s.preset}' preset{' in colour' if color else ''} (seed {s.seed}) "
          f"into {s.zip_dir}", flush=True)
    synthesize.synthesize(s.zip_dir, s.preset, seed=s.seed, workers=None, color=color)
  zips = [z for paths in zips_of(missing).values() for z in paths]
  partial = f" (missing: {', '.join(missing)}; already there: {', '.join(sorted(done))})"
  print(f"converting {len(missing)} mice into {data_dir}{partial if done else ''}", flush=True)
  from data_prep import convert   # TensorFlow only when there is work to do
  convert.convert(zips, data_dir)
