"""The comparison of docs/results.md: V1T vs the CNN core vs a 5-member V1T ensemble on the
synthetic demo mice, and V1T / CNN on the colour (Franke-style) mice with and without
gray_scale. Each run is `launch_train.py` as a user types it; wall time includes compilation,
evaluation and (for the first run of a dataset) synthesis and conversion. The runs of
docs/results.md used the "stream" training order (the default before session 10), so every run
here pins it (COMMON).

  python scripts/compare_cores.py --out runs/compare            # every run, then the table
  python scripts/compare_cores.py --out runs/compare --only cnn  # one run
  python scripts/compare_cores.py --out runs/compare --table     # the table of finished runs
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = ["--config.data.train_order=stream"]
RUNS = {   # name: (description, launch_train.py arguments)
    "v1t": ("V1T (demo config)", ["--config=configs/synthetic.py"]),
    "v1t_ensemble5": ("V1T, 5-member ensemble", ["--config=configs/synthetic.py",
                                                 "--config.train.ensemble_size=5"]),
    "cnn": ("CNN core (stacked2d, 16 channels)", ["--config=configs/synthetic_cnn.py"]),
    "color_v1t": ("V1T, colour", ["--config=configs/synthetic.py:color"]),
    "color_v1t_gray": ("V1T, colour, gray_scale", ["--config=configs/synthetic.py:color",
                                                   "--config.data.gray_scale=True"]),
    "color_cnn": ("CNN, colour", ["--config=configs/synthetic_cnn.py:color"]),
    "color_cnn_gray": ("CNN, colour, gray_scale", ["--config=configs/synthetic_cnn.py:color",
                                                   "--config.data.gray_scale=True"]),
}


def run(name: str, out: str):
  workdir = os.path.join(out, name)
  if os.path.exists(os.path.join(workdir, "evaluation.json")):
    print(f"{name}: done already ({workdir})", flush=True)
    return
  start = time.time()
  with open(os.path.join(out, f"{name}.log"), "w") as log:
    proc = subprocess.run([sys.executable, "launch_train.py", f"--workdir={workdir}",
                           *RUNS[name][1], *COMMON], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          check=False)
  wall = time.time() - start
  with open(os.path.join(out, f"{name}.time.json"), "w") as f:
    json.dump({"wall_s": wall, "returncode": proc.returncode}, f)
  print(f"{name}: exit {proc.returncode} after {wall / 60:.1f} min", flush=True)


def table(out: str) -> str:
  rows = ["| run | test single-trial corr | test corr to avg | test FEVE | oracle ratio "
          "(single-trial) | best epoch | wall time |", "|---|---|---|---|---|---|---|"]
  for name, (what, _) in RUNS.items():
    path = os.path.join(out, name, "evaluation.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      result = json.load(f)
    test = result["metrics"]["test"]["average"]
    oracle = result["metrics"].get("oracle", {}).get("test", {}).get("average", {})
    with open(os.path.join(out, f"{name}.time.json")) as f:
      wall = json.load(f)["wall_s"]
    ratio = test["single_trial_correlation"] / oracle["single_trial_correlation"] \
        if oracle.get("single_trial_correlation") else float("nan")
    feve = test.get("feve")
    members = result["metrics"].get("members", {}).get("test")
    extra = ""
    if members:
      extra = " (members " + ", ".join(
          f"{m['average']['single_trial_correlation']:.3f}" for m in members) + ")"
    rows.append(f"| {what} | {test['single_trial_correlation']:.4f}{extra} | "
                f"{test['correlation_to_average']:.4f} | "
                f"{'n/a' if feve is None else f'{feve:.3f}'} | {ratio:.3f} | "
                f"{result['epoch']} | {wall / 60:.1f} min |")
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/compare", help="folder of the runs and their logs")
  parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="these runs only")
  parser.add_argument("--table", action="store_true", help="only print the table")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if not args.table:
    for name in args.only or RUNS:
      run(name, args.out)
  print(table(args.out))


if __name__ == "__main__":
  main()
