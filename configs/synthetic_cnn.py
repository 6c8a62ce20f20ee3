"""The CNN baseline on the synthetic demo data: configs/synthetic.py with the original's
stacked2d core instead of the small ViT, for the ViT-vs-CNN comparison of docs/results.md (same
data, readouts, schedule and epochs). Scaled down as the demo ViT is: 16 hidden channels instead
of 64 (29 instead of 172 MFLOP per example; the demo ViT costs 14), the original's layers,
kernels and regulariser otherwise. The full-size baseline is configs/stacked2d.py.

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
  config.model.stacked2d.hidden_channels = 16
  if config.synthetic.preset == "tiny":
    config.model.stacked2d.update(num_layers=2, hidden_channels=8, input_kern=5, hidden_kern=3)
  return config
