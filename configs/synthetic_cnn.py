"""The CNN baseline on the synthetic demo data: configs/synthetic.py with the original's
stacked2d core (its defaults) instead of the small ViT, for the ViT-vs-CNN comparison of
docs/results.md (same data, readouts, schedule and epochs).

  python launch_train.py --config=configs/synthetic_cnn.py --workdir=runs/demo_cnn

`:tiny` is the test-sized variant (2 layers of 8 channels, 5x5 and 3x3 kernels).
"""

import ml_collections

from configs import synthetic


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = synthetic.get_config(arg)
  config.model.core = "stacked2d"
  config.model.behavior_mode = 1       # the CNN core has no B-MLP: behaviour as image channels
  config.train.lr = 0.009              # the original's stacked2d default
  if config.synthetic.preset == "tiny":
    config.model.stacked2d.update(num_layers=2, hidden_channels=8, input_kern=5, hidden_kern=3)
  return config
