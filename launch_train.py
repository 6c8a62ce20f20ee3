r"""The single entry point of v1t_jax: train, resume, evaluate.

  python launch_train.py --config=configs/synthetic.py --workdir=runs/demo
  python launch_train.py --config=configs/default.py --workdir=runs/v1t \
      --config.data.data_dir=data/sensorium_tfds
  python launch_train.py --config=configs/default.py --workdir=runs/v1t --mode=evaluate

Modes:
  train     train (resuming by itself when the workdir holds a checkpoint), then evaluate the
            best checkpoint on validation and test (evaluation.json)
  evaluate  restore the best checkpoint (or --config.eval.step) and write evaluation.json
  data      only make sure the dataset exists and print a summary of the input pipeline

A config with a `synthetic` section (configs/synthetic.py) synthesizes and converts its data on
first use. `--config.x=value` overrides any field; the config is locked, so a typo fails loudly.
"""

import json
import os

from v1t_jax import allocator

allocator.keep_freed_memory()   # before TensorFlow and JAX start threads; see allocator.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory", required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "data"], "what to run")
# Multi-process runs (v1t_jax/distributed.py); TPU pods and SLURM are detected without them.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "processes in the run (default: $JAX_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "this process's index (default: $JAX_PROCESS_ID)")


def main(argv):
  del argv
  # orbax and tfds log every file at INFO; our progress lines are printed (process 0), and every
  # scalar goes to TensorBoard through clu.
  logging.set_verbosity(logging.WARNING)
  from v1t_jax import distributed
  joined = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax
  from data_prep import prepare
  from v1t_jax import input_pipeline, train

  if joined and jax.process_index() == 0:
    print(f"{jax.process_count()} processes ({joined}), {jax.device_count()} devices", flush=True)

  config = _CONFIG.value
  workdir = _WORKDIR.value
  train.run_path(workdir).mkdir(parents=True, exist_ok=True)   # local or gs://
  if jax.process_count() > 1:
    # Process 0 makes a missing synthetic dataset first; on hosts that do not share its disk
    # (TPU VMs) each process then finds none and makes its own copy below.
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      prepare.ensure_dataset(config)
    multihost_utils.sync_global_devices("dataset ready")
  mice = prepare.ensure_dataset(config)
  if _MODE.value == "data":
    result = input_pipeline.summarize(mice, config.data)
    if jax.process_index() == 0:
      (train.run_path(workdir) / "data_summary.json").write_text(json.dumps(result, indent=1))
  elif _MODE.value == "train":
    result = train.train_and_evaluate(config, workdir)
  else:
    result = train.evaluate_checkpoint(config, workdir)
  print(json.dumps(result))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
