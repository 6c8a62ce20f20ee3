"""Makes sure the dataset a config names exists: synthesizes and converts the synthetic default.

A config with a `synthetic` section (configs/synthetic.py) describes data we can make here: when
`data.data_dir` holds no converted mouse, the preset's zips are written to `synthetic.zip_dir`
(unless already there) and converted. Real data must be converted by the user first
(`python -m data_prep.convert`); a missing real dataset is a clear error.
"""

from __future__ import annotations

import glob
import os

from v1t_jax import dataset_meta


def ensure_dataset(config) -> list[dataset_meta.MouseMeta]:
  """The config's mice, synthesizing + converting them first when the config says how."""
  data_dir = config.data.data_dir
  if not dataset_meta.available_mice(data_dir) and "synthetic" in config:
    from data_prep import convert, synthesize   # TF only when there is work to do
    s = config.synthetic
    zips = sorted(glob.glob(os.path.join(s.zip_dir, "static*.zip")))
    if not zips:
      print(f"synthesizing the '{s.preset}' preset (seed {s.seed}) into {s.zip_dir}", flush=True)
      zips = synthesize.synthesize(s.zip_dir, s.preset, seed=s.seed, workers=None)
    print(f"converting {len(zips)} mice into {data_dir}", flush=True)
    convert.convert(zips, data_dir)
  return dataset_meta.resolve_mice(data_dir, tuple(config.data.mice))
