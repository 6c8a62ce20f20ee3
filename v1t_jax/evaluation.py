"""Evaluation of a run: the challenge metrics of each tier (sensorium_format.md §7), the oracle
ceiling from the synthetic ground truth, the tables and `evaluation.json`."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from v1t_jax import dataset_meta, metrics
from v1t_jax.checkpoints import RunError, one_line, restore, run_path
from v1t_jax.progress import Progress, every_s, say


def tier_metrics(trainer, state: dict, tier: str, mice: list[int],
                 truth: dict[int, np.ndarray] | None = None) -> dict:
  """Single-trial correlation, correlation to average and FEVE of `tier` for the given mice
  (and of the noise-free truth, the oracle, where `truth` gives standardised rates per trial).
  An ensemble's "model" is its members' average prediction; "members" has each member's."""
  from v1t_jax import input_pipeline
  ds, num_batches = trainer.eval_data(tier)
  model = {m: metrics.TierMetrics(trainer.neuron_counts[m]) for m in mice}
  oracle = {m: metrics.TierMetrics(trainer.neuron_counts[m]) for m in (truth or {})}
  progress = Progress(f"challenge metrics on {tier}", num_batches, "batch",
                      every_s=every_s(trainer.config))
  members = [{m: metrics.TierMetrics(trainer.neuron_counts[m]) for m in mice}
             for _ in range(trainer.members if trainer.members > 1 else 0)]
  for i, b in enumerate(input_pipeline.as_numpy(ds)):
    progress(i)
    out = trainer.eval_step(state["params"], state["buffers"], trainer.device_batch(b))
    pred = np.asarray(out["pred"])   # replicated output
    b = {k: _all_rows(b[k]) for k in ("responses", "image_id", "valid", "trial")}
    for m in mice:
      model[m].add(pred[m], b["responses"][m], b["image_id"][m], b["valid"][m])
    for k, member in enumerate(members):
      member_pred = np.asarray(out["member_pred"][k])
      for m in mice:
        member[m].add(member_pred[m], b["responses"][m], b["image_id"][m], b["valid"][m])
    for m, rates in (truth or {}).items():
      valid = b["valid"][m]
      oracle[m].add(rates[np.where(valid, b["trial"][m], 0)], b["responses"][m],
                    b["image_id"][m], valid)
  out = {"model": _by_mouse({trainer.names[m]: a.result() for m, a in model.items()})}
  if oracle:
    out["oracle"] = _by_mouse({trainer.names[m]: a.result() for m, a in oracle.items()})
  if members:
    out["members"] = [_by_mouse({trainer.names[m]: a.result() for m, a in member.items()})
                      for member in members]
  return out


def _all_rows(local_MxB):
  """The global batch rows of a host-local [M, B_local, ...] array (identity on one process)."""
  if jax.process_count() == 1:
    return local_MxB
  from jax.experimental import multihost_utils
  rows = multihost_utils.process_allgather(np.moveaxis(local_MxB, 1, 0), tiled=True)
  return np.moveaxis(np.asarray(rows), 0, 1)


def _json_safe(tree):
  """NaN -> None, so the files are strict JSON."""
  if isinstance(tree, dict):
    return {k: _json_safe(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_json_safe(v) for v in tree]
  if isinstance(tree, float) and not np.isfinite(tree):
    return None
  return tree


def _by_mouse(per_mouse: dict[str, dict]) -> dict:
  """{mouse: metrics} plus the unweighted mean over mice under "average"."""
  keys = next(iter(per_mouse.values())).keys()
  def mean(values):   # FEVE is NaN where a tier has no repeats; average what is defined
    finite = [x for x in values if np.isfinite(x)]
    return float(np.mean(finite)) if finite else float("nan")

  average = {k: mean([v[k] for v in per_mouse.values()]) for k in keys}
  return {**per_mouse, "average": average}


def synthetic_truth(trainer) -> dict[int, np.ndarray]:
  """Standardised noise-free rates [trials, N] per mouse of a synthetic config (file order)."""
  if "synthetic" not in trainer.config:
    return {}
  out = {}
  for m, meta in enumerate(trainer.mice):
    path = os.path.join(trainer.config.synthetic.zip_dir,
                        meta.info["source_name"][: -len(".zip")] + ".truth.npz")
    if os.path.exists(path):
      rates = np.load(path)["rates"] * dataset_meta.normalisation(meta).response_precision
      out[m] = np.pad(rates, [(0, 0), (0, max(trainer.neuron_counts) - rates.shape[1])])
  return out


def evaluable_test_mice(trainer) -> list[int]:
  """Mice whose test responses are not withheld (hashed trial ids mark competition mice)."""
  return [i for i, m in enumerate(trainer.mice)
          if m.tier_size("test") and not m.info.get("trial_idx_hashed")]


def metrics_table(challenge: dict) -> str:
  """The averaged challenge metrics of each tier as a readable table, next to the oracle ceiling
  (and the model / oracle ratio) where the synthetic ground truth exists."""
  names = ("single_trial_correlation", "correlation_to_average", "feve")
  oracle = challenge.get("oracle", {})
  lines = []
  for tier, per_mouse in challenge.items():
    if tier in ("oracle", "members") or "average" not in per_mouse:
      continue
    mice = len(per_mouse) - 1
    ceiling = oracle.get(tier, {}).get("average")
    header = f"{tier} ({mice} {'mouse' if mice == 1 else 'mice'}, averaged)"
    lines.append(f"{header:34s} {'model':>7s}"
                 + (f" {'oracle':>7s} {'ratio':>6s}" if ceiling else ""))
    for name in names:
      value = per_mouse["average"].get(name)
      if value is None:
        continue
      row = f"  {name:32s} {value:7.3f}"
      if ceiling and ceiling.get(name) is not None:
        row += f" {ceiling[name]:7.3f}"
        if ceiling[name] > 0:   # a ratio to a ceiling <= 0 (or of two negatives) means nothing
          row += f" {value / ceiling[name]:5.2f}x"
      lines.append(row)
    member_values = [m["average"]["single_trial_correlation"]
                     for m in challenge.get("members", {}).get(tier, [])]
    if member_values:   # an ensemble: the average above, each member here
      lines.append("  single_trial_correlation of each member: "
                   + " ".join(f"{v:.3f}" for v in member_values))
  return "\n".join(lines)


def scalars(prefix: str, result: dict) -> dict:
  out = {}
  for key, value in result.items():
    if isinstance(value, dict):
      out.update({f"{prefix}/{key}/{mouse}": v for mouse, v in value.items()})
      out[f"{prefix}/{key}/average"] = float(np.mean(list(value.values())))
    elif isinstance(value, (list, tuple)):   # per ensemble member
      out.update({f"{prefix}/{key}/{k}": v for k, v in enumerate(value)})
    else:
      out[f"{prefix}/{key}"] = value
  return out


def evaluate_best(trainer, best, workdir: str, writer=None, step: int = 0,
                  checkpoint_step: int | None = None, figures=None) -> dict:
  """Evaluates the best (or a given) checkpoint on validation and test; writes evaluation.json."""
  if best.latest_step() is None:
    raise RunError(f"{workdir}: no checkpoint to evaluate (expected {workdir}/best)")
  step = best.latest_step() if checkpoint_step is None else checkpoint_step
  try:
    state, meta = restore(best, trainer, step)
  except Exception as e:   # orbax, tensorstore and json raise many types
    raise RunError(f"checkpoint {best.directory / str(step)} is damaged ({one_line(e)})") from e
  result = {"checkpoint_step": int(meta["step"]), "epoch": int(meta["epoch"]),
            "validation": trainer.evaluate(state, "validation")}
  keep = evaluable_test_mice(trainer)
  # The challenge's metrics (sensorium_format.md §7) for every mouse with targets, plus the
  # oracle ceiling where the synthetic ground truth exists.
  truth = synthetic_truth(trainer)
  challenge, oracle, members = {}, {}, {}
  for tier, mice in (("validation", list(range(len(trainer.mice)))), ("test", keep)):
    if mice:
      r = tier_metrics(trainer, state, tier, mice, {m: truth[m] for m in mice if m in truth})
      challenge[tier] = r["model"]
      if "oracle" in r:
        oracle[tier] = r["oracle"]
      if "members" in r:
        members[tier] = r["members"]
  if oracle:
    challenge["oracle"] = oracle
  if members:   # an ensemble: "validation"/"test" hold the members' average
    challenge["members"] = members
  challenge = _json_safe(challenge)   # undefined values (FEVE without repeats) become null
  result["metrics"] = challenge
  if "test" in challenge:   # the summary's test numbers, from the same pass
    per_mouse = {n: v["single_trial_correlation"] for n, v in challenge["test"].items()
                 if n != "average"}
    result["test"] = {"single_trial_correlation": per_mouse,
                      "single_trial_correlation_average": challenge["test"]["average"][
                          "single_trial_correlation"]}
  say(metrics_table(challenge))
  if jax.process_index() == 0:
    (run_path(workdir) / "eval").mkdir(parents=True, exist_ok=True)
    (run_path(workdir) / "eval" / "metrics.json").write_text(json.dumps(challenge, indent=1))
    (run_path(workdir) / "evaluation.json").write_text(json.dumps(result, indent=1))
    if writer is not None:
      logged = scalars("final_val", result["validation"])
      if "test" in result:
        logged.update(scalars("test", result["test"]))
      for tier, per_mouse in challenge.items():
        if tier not in ("oracle", "members"):
          logged.update({f"eval/{tier}/{k}/{mouse}": v for mouse, d in per_mouse.items()
                          for k, v in d.items() if v is not None})
      writer.write_scalars(step, logged)
      if figures is not None and trainer.config.train.figures_every_epochs:
        figures(writer, trainer, state, step, prefix="best/")
  return result

