r"""The oracle ceiling of synthetic mice: how well the noise-free truth predicts the recordings.

  python -m data_prep.oracle --zips data/synthetic_demo_zips --tier test

For every `<stem>.zip` with its `<stem>.truth.npz` (written by `data_prep.synthesize`), prints one
JSON line with the single-trial correlation between the true rates and the recorded responses of
the tier, per mouse and averaged: the best a model can reach on that tier. Correlation is
per neuron over the tier's trials (population std, +1e-8), as the Sensorium metric; it does not
depend on the response standardisation.
"""

import glob
import json
import os

import numpy as np
from absl import flags

from data_prep.sensorium_source import MouseSource
from v1t_jax import cli, metrics


def oracle(zip_path: str, tier: str) -> float:
  truth = np.load(zip_path[:-4] + ".truth.npz")
  rows = np.flatnonzero(truth["tiers"] == tier)
  if rows.size == 0 or truth["withheld"][rows].any():
    return float("nan")   # no such tier, or its responses are withheld in the zip
  with MouseSource(zip_path) as src:
    responses = np.stack([src.load(f"data/responses/{i}.npy") for i in rows])
  return float(metrics.correlation_reference(truth["rates"][rows], responses).mean())


def oracles(zip_dir: str, tier: str) -> dict:
  zips = sorted(p for p in glob.glob(os.path.join(zip_dir, "static*.zip"))
                if os.path.exists(p[:-4] + ".truth.npz"))
  if not zips:
    raise FileNotFoundError(f"{zip_dir}: no static*.zip with a .truth.npz beside it")
  per_mouse = {MouseSource(p).data_key: oracle(p, tier) for p in zips}
  valid = [v for v in per_mouse.values() if np.isfinite(v)]
  return {"tier": tier, "oracle_single_trial_correlation": per_mouse,
          "average": float(np.mean(valid)) if valid else float("nan")}


_ZIPS = flags.DEFINE_string("zips", None, "folder of synthetic zips", required=True)
_TIER = flags.DEFINE_string("tier", "test", "tier")


def main(argv):
  cli.no_positional(argv)
  print(json.dumps(oracles(_ZIPS.value, _TIER.value)))


if __name__ == "__main__":
  cli.run(main)
