r"""The single entry point of v1t_jax.

  python launch_train.py --config=configs/synthetic.py --workdir=runs/demo --mode=data

Modes:
  data   make sure the config's dataset exists (the synthetic default is synthesized and
         converted on first use), then print a JSON summary of the input pipeline and its
         measured throughput (also written to <workdir>/data_summary.json).

`--config.x=value` overrides any config field; the config is locked, so a typo fails loudly.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory", required=True)
_MODE = flags.DEFINE_enum("mode", "data", ["data"], "what to run")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from data_prep import prepare
  from v1t_jax import input_pipeline

  config = _CONFIG.value
  mice = prepare.ensure_dataset(config)
  summary = input_pipeline.summarize(mice, config.data)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, "data_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
