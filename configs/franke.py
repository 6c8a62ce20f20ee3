"""V1T on the Franke et al. 2022 colour data (UV + green 2x36x64 images, mice F-O).

  python -m data_prep.convert --src path/to/franke_zips --data_dir data/franke_tfds
  python launch_train.py --config=configs/franke.py --workdir=runs/v1t_franke
  python launch_train.py --config=configs/franke.py:gray --workdir=runs/v1t_franke_gray

The images are already 36x64, so the resize is the identity; the core sees 2 channels, or 1 with
`:gray` (the original's --gray_scale: the channel mean after standardising). Every other default
is the original's (model_spec.md §12).
"""

import ml_collections

from configs import default

FRANKE_MICE = ("F", "G", "H", "I", "J", "K", "L", "M", "N", "O")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "gray"):
    raise ValueError(f"configs/franke.py takes nothing or ':gray', got {arg!r}")
  config = default.get_config()
  config.data.data_dir = "data/franke_tfds"
  config.data.mice = FRANKE_MICE
  config.data.gray_scale = arg == "gray"
  return config
