r"""The single entry point of v1t_jax: train, resume, evaluate.

  python launch_train.py --config=configs/synthetic.py --workdir=runs/demo
  python launch_train.py --config=configs/default.py --workdir=runs/v1t \
      --config.data.data_dir=data/sensorium_tfds
  python launch_train.py --config=configs/default.py --workdir=runs/v1t --mode=evaluate

Modes:
  train        train (resuming by itself when the workdir holds a checkpoint), then evaluate
               the best checkpoint on validation and test (evaluation.json)
  evaluate     restore the best checkpoint (or --config.eval.step) and write evaluation.json
  data         only make sure the dataset exists and print a summary of the input pipeline
  show_config  print the config with the overrides applied: every field `--config.x=value`
               can set (no --workdir needed), e.g.
               python launch_train.py --config=configs/synthetic.py --mode=show_config

A config with a `synthetic` section (configs/synthetic.py) synthesizes and converts its data on
first use. `--config.x=value` overrides any field; the config is locked, so a typo fails loudly.
"""

import json
import os

from v1t_jax import allocator

allocator.keep_freed_memory()   # before TensorFlow and JAX start threads; see allocator.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from v1t_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (every mode but show_config)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "data", "show_config"],
                          "what to run")
flags.register_multi_flags_validator(
    ["workdir", "mode"], lambda f: f["workdir"] is not None or f["mode"] == "show_config",
    "--workdir is required (except with --mode=show_config)")
# Multi-process runs (v1t_jax/distributed.py); TPU pods and SLURM are detected without them.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "processes in the run (default: $JAX_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "this process's index (default: $JAX_PROCESS_ID)")
_CACHE = flags.DEFINE_string("compilation_cache", None, cli.CACHE_HELP)


def main(argv):
  cli.no_positional(argv)
  if _MODE.value == "show_config":
    print(_CONFIG.value)   # YAML-like, every field that --config.x= can set
    return
  # orbax and tfds log every file at INFO; our progress lines are printed (process 0), and every
  # scalar goes to TensorBoard through clu.
  logging.set_verbosity(logging.WARNING)
  from v1t_jax import distributed
  joined = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax
  try:
    cli.compilation_cache(_CACHE.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None

  from data_prep import prepare
  from v1t_jax import checkpoints, figures, input_pipeline, train

  if joined and jax.process_index() == 0:
    print(f"{jax.process_count()} processes ({joined}), {jax.device_count()} devices", flush=True)

  config = _CONFIG.value
  workdir = _WORKDIR.value
  if _MODE.value == "evaluate":
    try:   # before the dataset is made or read: no checkpoint, no work
      checkpoints.require_checkpoint(config, workdir)
    except checkpoints.RunError as e:
      raise SystemExit(f"error: {e}") from None
  else:
    checkpoints.run_path(workdir).mkdir(parents=True, exist_ok=True)   # local or gs://
  try:
    if jax.process_count() > 1:
      # Process 0 makes a missing synthetic dataset first; on hosts that do not share its disk
      # (TPU VMs) each process then finds none and makes its own copy below.
      from jax.experimental import multihost_utils
      if jax.process_index() == 0:
        prepare.ensure_dataset(config)
      multihost_utils.sync_global_devices("dataset ready")
    mice = prepare.ensure_dataset(config)
  except prepare.DataDirError as e:   # one line: the folder and what is wrong with it
    raise SystemExit(f"error: {e}") from None
  if _MODE.value == "data":
    result = input_pipeline.summarize(mice, config.data)
    if jax.process_index() == 0:
      summary = checkpoints.run_path(workdir) / "data_summary.json"
      summary.write_text(json.dumps(result, indent=1))
  else:
    try:
      if _MODE.value == "train":
        result = train.train_and_evaluate(config, workdir, figures=figures.write_summary)
      else:
        result = train.evaluate_checkpoint(config, workdir)
    except checkpoints.RunError as e:   # one line, no traceback: what went wrong and what to do
      raise SystemExit(f"error: {e}") from None
  print(json.dumps(result))
  if result.get("error"):   # e.g. NaN: the best state was evaluated, but the run failed
    raise SystemExit(f"error: {result['error']}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(main)
