"""The CNN baseline: the original's `--core stacked2d` with its defaults on Sensorium+.

Same mice, readouts, shifters, loss and schedule as configs/default.py; the core is
v1t_jax/stacked2d.py. Behaviour enters as 3 extra image channels (behavior_mode 1: the CNN core
has no B-MLP), and the lr is the original's stacked2d default (train.py: 0.009).

  python launch_train.py --config=configs/stacked2d.py --workdir=runs/cnn \
      --config.data.data_dir=data/sensorium_tfds
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = default.get_config()
  config.model.core = "stacked2d"
  config.model.behavior_mode = 1
  config.train.lr = 0.009
  config.train.microbatches = 1        # BatchNorm statistics of the whole per-mouse batch
  return config
