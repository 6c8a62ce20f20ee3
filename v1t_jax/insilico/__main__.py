r"""In-silico experiments on a trained run, from the command line.

  python -m v1t_jax.insilico --workdir runs/demo --mouse 91001-0-0 --what meis --neurons 0-15
  python -m v1t_jax.insilico --workdir runs/demo --mouse 91001-0-0 --what rf,tuning
  python -m v1t_jax.insilico --workdir runs/demo --mouse 91001-0-0 --truth

`--what` takes meis, rf and tuning (comma-separated). Each writes `<name>.npz` (every array of
the result) and `<name>.png` into `--out` (default `<workdir>/insilico/<mouse>/`). Behaviour and
pupil centre are held at `--behavior` / `--pupil_center` (raw values; default: the mouse's
recorded means). `--neurons` takes indices and ranges (`0-15,40`; column order of the mouse's
predictions) or `all` (the default, but 16 neurons for MEIs).

`--truth` (synthetic runs) compares the model's receptive-field centres (white-noise maps),
preferred orientations and spatial frequencies (full-field gratings) and simple/complex calls
(F1/F0) with the simulator's ground truth, as medians over the neurons whose test correlation
is in the top half, and runs the same experiments on the ground-truth model itself as a ceiling.
It writes `recovery.json` and `recovery.png`; the last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from v1t_jax import cli

EXPERIMENTS = ("meis", "rf", "tuning")
MEI_DEFAULT_NEURONS = 16


def parse_neurons(spec: str | None, n: int) -> np.ndarray | None:
  """'0-15,40' -> [0..15, 40]; 'all' or None -> None (every neuron)."""
  if spec is None or spec.strip() == "all":
    return None
  out = []
  for part in spec.split(","):
    part = part.strip()
    try:
      if "-" in part:
        a, b = (int(v) for v in part.split("-", 1))
        if b < a:
          raise ValueError
        out.extend(range(a, b + 1))
      else:
        out.append(int(part))
    except ValueError:
      raise ValueError(f"--neurons: cannot read {part!r} (expected indices and ranges like "
                       "'0-15,40', or 'all')") from None
  idx = np.unique(np.asarray(out, np.int64))
  if idx.size and (idx.min() < 0 or idx.max() >= n):
    raise ValueError(f"--neurons: indices must be in 0-{n - 1} for this mouse, got {spec!r}")
  return idx


def _floats(spec: str | None, n: int, flag: str) -> np.ndarray | None:
  if spec is None:
    return None
  try:
    values = np.asarray([float(v) for v in spec.split(",")], np.float32)
  except ValueError:
    raise ValueError(f"{flag}: expected {n} comma-separated numbers, got {spec!r}") from None
  if values.shape != (n,) or not np.all(np.isfinite(values)):
    raise ValueError(f"{flag}: expected {n} finite comma-separated numbers, got {spec!r}")
  return values


def _flatten(result: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in result.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def _save(out_dir: str, name: str, result: dict, fig=None) -> list[str]:
  """`name`.npz (written beside and renamed, so a kill leaves no half file) and `name`.png."""
  from v1t_jax.figures import save_png
  path = os.path.join(out_dir, name + ".npz")
  np.savez(path + ".partial.npz", **_flatten(result))
  os.replace(path + ".partial.npz", path)
  written = [path]
  if fig is not None:
    written.append(save_png(fig, os.path.join(out_dir, name + ".png")))
  return written


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m v1t_jax.insilico",
                              description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n", 2)[2])
  p.add_argument("--workdir", required=True, help="run directory of launch_train.py")
  p.add_argument("--mouse", required=True, help="mouse name (V1T id) or data key")
  p.add_argument("--what", default=None,
                 help="comma-separated: meis, rf, tuning (default with --truth: rf,tuning)")
  p.add_argument("--neurons", default=None, help="indices/ranges, e.g. 0-15,40, or all")
  p.add_argument("--out", default=None, help="output folder (default <workdir>/insilico/<mouse>)")
  p.add_argument("--behavior", default=None, help="raw behaviour 'a,b,c' (default: the mean)")
  p.add_argument("--pupil_center", default=None, help="raw pupil centre 'x,y' (default: the mean)")
  p.add_argument("--truth", action="store_true",
                 help="compare with the synthetic ground truth (synthetic runs)")
  p.add_argument("--truth_zips", default=None,
                 help="folder of the synthetic zips and truth files (default: the run's "
                      "config.synthetic.zip_dir)")
  p.add_argument("--which", default="best", choices=["best", "latest"])
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--device", default=None, help="cpu, gpu or tpu (default: JAX's default)")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--compilation_cache", default=None, help=cli.CACHE_HELP)
  p.add_argument("--seed", type=int, default=0, help="white-noise seed")
  m = p.add_argument_group("MEIs")
  m.add_argument("--seeds", type=int, default=4, help="MEIs per neuron (seeds 0..S-1)")
  m.add_argument("--steps", type=int, default=80)
  m.add_argument("--lr", type=float, default=0.1)
  m.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
  m.add_argument("--norm", type=float, default=10.0,
                 help="L2 norm of the MEI in model-input units (<= 0: free)")
  m.add_argument("--precondition", default="blur", choices=["blur", "fourier", "none"])
  m.add_argument("--blur_sigma", type=float, default=1.0)
  m.add_argument("--jitter", type=int, default=1)
  r = p.add_argument_group("receptive fields")
  r.add_argument("--n_noise", type=int, default=20000, help="white-noise images")
  t = p.add_argument_group("tuning")
  t.add_argument("--orientations", type=int, default=16)
  t.add_argument("--phases", type=int, default=8)
  t.add_argument("--contrast", type=float, default=1.0,
                 help="grating amplitude in model-input units")
  t.add_argument("--rf_centred", action="store_true",
                 help="also gratings in an aperture at each neuron's fitted RF centre")
  t.add_argument("--aperture_sigma", type=float, default=6.0)
  return p


def main(argv: Sequence[str] | None = None) -> dict:
  args = build_parser().parse_args(argv)
  what = [] if args.what is None else [w.strip() for w in args.what.split(",") if w.strip()]
  unknown = sorted(set(what) - set(EXPERIMENTS))
  if unknown:
    raise ValueError(f"--what: unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}")
  if not what and not args.truth:
    raise ValueError("--what: say which experiments to run (meis, rf, tuning) or pass --truth")
  if args.truth:
    what = list(dict.fromkeys(what + ["rf", "tuning"]))
  if args.rf_centred and not ("rf" in what and "tuning" in what):
    raise ValueError("--rf_centred needs rf and tuning in --what (the gratings are centred on "
                     "the fitted receptive fields)")
  for flag in ("batch_size", "steps", "n_noise", "seeds"):
    if getattr(args, flag) < 1:
      raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")

  from v1t_jax import insilico as ex
  from v1t_jax import predict
  from v1t_jax.insilico import figures as fig_lib
  from v1t_jax.insilico import truth as truth_lib
  cli.compilation_cache(args.compilation_cache)

  predictor = predict.Predictor.from_workdir(args.workdir, which=args.which, step=args.step,
                                             device=args.device)
  record = predictor.mouse(args.mouse)
  neurons = parse_neurons(args.neurons, record.neurons)
  behavior = _floats(args.behavior, 3, "--behavior")
  pupil = _floats(args.pupil_center, 2, "--pupil_center")
  population = None
  if args.truth:   # before any long work: a missing truth file fails at once
    zip_dir = args.truth_zips or predictor.config.get("synthetic", {}).get("zip_dir")
    if not zip_dir:
      raise ValueError(f"--truth: {args.workdir} is not a synthetic run; pass --truth_zips")
    truth_path, zip_path = truth_lib.find_truth_file(record.data_key, zip_dir)
    population = truth_lib.load_population(truth_path)
    if population.n_neurons != record.neurons:
      raise ValueError(f"{truth_path}: {population.n_neurons} neurons, the run's mouse "
                       f"{record.name} has {record.neurons}")
    ref_b, ref_p = truth_lib.reference_behavior(record)
    behavior = ref_b if behavior is None else behavior
    pupil = ref_p if pupil is None else pupil
  subject = ex.Subject.from_predictor(predictor, record.name, behavior, pupil)
  out_dir = args.out or os.path.join(args.workdir, "insilico", record.name)
  os.makedirs(out_dir, exist_ok=True)
  summary = {"mouse": record.name, "checkpoint": predictor.path, "out": out_dir}
  results = {}

  def say(message: str):
    print(message, file=sys.stderr, flush=True)

  def finish(name: str, res: dict, fig, started: float, message: str):
    seconds = time.time() - started
    _save(out_dir, name, res, fig)
    say(f"{name}: {message} in {seconds:.1f} s")
    summary[f"{name}_seconds"] = round(seconds, 2)
    results[name] = res

  if "meis" in what:
    chosen = neurons if neurons is not None else np.arange(min(MEI_DEFAULT_NEURONS,
                                                               record.neurons))
    start = time.time()
    res = ex.meis(subject, chosen, seeds=range(args.seeds), steps=args.steps, lr=args.lr,
                  optimizer=args.optimizer, norm=args.norm if args.norm > 0 else None,
                  precondition=args.precondition, blur_sigma=args.blur_sigma,
                  jitter=args.jitter, progress=True)
    c = res["images"].shape[-1]
    res["images_raw"] = (res["images"] * record.image_std.reshape(-1)[:c]
                         + record.image_mean.reshape(-1)[:c])
    finish("meis", res, fig_lib.plot_meis(res, f"MEIs, {subject.name}"), start,
           f"{len(chosen)} neurons x {args.seeds} seeds, {args.steps} steps, median activation "
           f"{np.median(res['activations']):.3f},")
  if "rf" in what:
    start = time.time()
    res = ex.receptive_fields(subject, neurons, n_noise=args.n_noise, batch_size=args.batch_size,
                              seed=args.seed, progress=True)
    true_c = None if population is None else truth_lib.true_properties(population,
                                                                         pupil)["center"]
    fig = fig_lib.plot_receptive_fields(res, true_centers=true_c,
                                        title=f"Receptive fields, {subject.name}")
    finish("rf", res, fig, start, f"{len(res['neurons'])} neurons, {args.n_noise} noise images")
  if "tuning" in what:
    start = time.time()
    res = ex.grating_tuning(subject, neurons, orientations=args.orientations, phases=args.phases,
                            contrast=args.contrast, batch_size=args.batch_size, progress=True)
    if args.rf_centred:
      centers = ex.rf_centers(results["rf"])
      ok = np.all(np.isfinite(centers), axis=1)
      res["rf_centred"] = ex.grating_tuning(
          subject, res["neurons"][ok], orientations=args.orientations, phases=args.phases,
          contrast=args.contrast, centers=centers[ok], aperture_sigma=args.aperture_sigma,
          batch_size=args.batch_size, progress=True)
    finish("tuning", res, fig_lib.plot_tuning(res, f"Grating tuning, {subject.name}"), start,
           f"{len(res['neurons'])} neurons, {np.mean(res['is_simple']):.0%} simple (F1/F0 > 1),")

  if args.truth:
    summary.update(_recovery(args, predictor, record, subject, population, truth_path, zip_path,
                             pupil, behavior, results, out_dir, say))
  print(json.dumps(summary))
  return summary


def _recovery(args, predictor, record, subject, population, truth_path, zip_path, pupil,
              behavior, results, out_dir, say) -> dict:
  from v1t_jax import insilico as ex
  from v1t_jax import metrics
  from v1t_jax.figures import save_png
  from v1t_jax.insilico import figures as fig_lib
  from v1t_jax.insilico import truth as truth_lib

  start = time.time()
  test = truth_lib.read_tier(zip_path, truth_path, "test")
  pred = predictor.predict(record.name, test["images"], test["behavior"], test["pupil_center"],
                           batch_size=args.batch_size)
  corr = metrics.correlation_reference(pred, test["responses"])   # the evaluator's formula
  measured = results["rf"]["neurons"]
  selected = measured[corr[measured] >= np.median(corr[measured])]
  props = truth_lib.true_properties(population, pupil)
  truth_model = truth_lib.truth_subject(population, record, subject.image_hwc, behavior, pupil)
  ceiling_rf = ex.receptive_fields(truth_model, measured, n_noise=args.n_noise,
                                   batch_size=args.batch_size, seed=args.seed, progress=True)
  ceiling_tuning = ex.grating_tuning(truth_model, measured, orientations=args.orientations,
                                     phases=args.phases, contrast=args.contrast,
                                     batch_size=args.batch_size)
  model = truth_lib.recovery(results["rf"], results["tuning"], props, selected)
  ceiling = truth_lib.recovery(ceiling_rf, ceiling_tuning, props, selected)
  keys = ("rf_center_error_px", "orientation_error_deg", "sf_ratio", "simple_complex_accuracy")
  say(f"recovery over the {len(selected)} neurons with the top-half test correlation "
      f"(median {np.median(corr[selected]):.3f}), in {time.time() - start:.1f} s:")
  say(f"  {'':22s}" + "".join(f"{k:>26s}" for k in keys))
  for name, rec in (("trained model", model), ("ground-truth model", ceiling)):
    say(f"  {name:22s}" + "".join(f"{rec[k]:26.3f}" for k in keys))
  _save(out_dir, "recovery", {"test_correlation": corr, "selected": selected,
                              "model": model["per_neuron"], "ground_truth_model":
                              ceiling["per_neuron"], "truth": props})
  save_png(fig_lib.plot_recovery({"trained model": model, "ground-truth model": ceiling}),
           os.path.join(out_dir, "recovery.png"))
  out = {k: model[k] for k in keys}
  out["neurons"] = model["neurons"]
  out["test_correlation_median"] = float(np.median(corr[selected]))
  out["ground_truth_model"] = {k: ceiling[k] for k in keys}
  with open(os.path.join(out_dir, "recovery.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError, ImportError) as e:
    sys.exit(f"error: {e}")
