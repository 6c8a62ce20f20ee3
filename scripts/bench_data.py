r"""Data benchmarks: conversion trials/s and input-pipeline examples/s, one JSON line each.

  python scripts/bench_data.py --workdir /tmp/bench_data --mice 3 --trials 1000

Writes `--mice` synthetic mice of the `sensorium` preset (real neuron counts, 144x256 images,
~1,000 test trials each; `--trials` train + validation trials per mouse) unless they are already
in `--workdir`, then measures:
  convert   trials/s of `data_prep.convert` (reading zips, validating, writing TFRecord shards;
            TensorFlow is already imported, as in any process that converts)
  pipeline  examples/s of `input_pipeline.train_dataset` for [mice, batch, 36, 64, 1] batches,
            after one warm-up epoch (the train shards are cached in memory from then on)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from data_prep import convert, synthesize  # noqa: E402
from v1t_jax import dataset_meta  # noqa: E402
from v1t_jax import input_pipeline as ip  # noqa: E402


def machine() -> str:
  return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def make_zips(out: str, mice: int, trials: int, seed: int) -> list[str]:
  zips = sorted(glob.glob(os.path.join(out, "static*.zip")))
  if len(zips) >= mice:
    return zips[:mice]
  preset = dataclasses.replace(synthesize.PRESETS["sensorium"], competition=False)
  specs = synthesize.mouse_specs(preset, seed, trials)[:mice]
  os.makedirs(out, exist_ok=True)
  return [synthesize.write_mouse(out, s, preset, seed, color=False) for s in specs]


def bench_convert(zips: list[str], data_dir: str) -> dict:
  shutil.rmtree(data_dir, ignore_errors=True)
  t0 = time.perf_counter()
  results = convert.convert(zips, data_dir)
  seconds = time.perf_counter() - t0
  trials = sum(r.trials for r in results)
  return {"what": "convert", "trials": trials, "seconds": round(seconds, 2),
          "trials_per_s": round(trials / seconds, 1),
          "mice": len(zips), "machine": machine()}


def bench_pipeline(data_dir: str, batch_size: int, steps: int) -> dict:
  mice = dataset_meta.resolve_mice(data_dir)
  cfg = default.data_config()
  cfg.batch_size = batch_size
  it = iter(ip.as_numpy(ip.train_dataset(mice, cfg, process_index=0, process_count=1)))
  for _ in range(ip.steps_per_epoch(mice, batch_size) + 5):   # one epoch fills the cache
    batch = next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
  seconds = time.perf_counter() - t0
  examples = steps * len(mice) * batch_size
  return {"what": "pipeline", "batch": list(batch["image"].shape),
          "neurons_max": batch["responses"].shape[-1], "steps": steps,
          "examples_per_s": round(examples / seconds, 1), "machine": machine()}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/v1t_bench_data")
  p.add_argument("--mice", type=int, default=3)
  p.add_argument("--trials", type=int, default=1000)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  zips = make_zips(os.path.join(args.workdir, "zips"), args.mice, args.trials, args.seed)
  data_dir = os.path.join(args.workdir, "tfds")
  print(json.dumps(bench_convert(zips, data_dir)), flush=True)
  print(json.dumps(bench_pipeline(data_dir, args.batch_size, args.steps)), flush=True)


if __name__ == "__main__":
  main()
