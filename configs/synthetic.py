"""The synthetic demo: the `demo` preset of `data_prep.synthesize`, converted to TFRecord shards.

  python launch_train.py --config=configs/synthetic.py --workdir=runs/demo

`--config.data.data_dir` is where the converted shards go; `synthetic.zip_dir` where the zips
are written when the data directory does not hold the mice yet. `:tiny` selects the test-sized
variant (the `tiny` preset and a two-block model).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "demo"
  if variant not in ("demo", "tiny"):
    raise ValueError(f"configs/synthetic.py takes ':demo' or ':tiny', got {arg!r}")
  config = default.get_config()
  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.preset = variant               # data_prep.synthesize preset
  config.synthetic.seed = 0
  config.synthetic.zip_dir = f"data/synthetic_{variant}_zips"
  config.data.data_dir = f"data/synthetic_{variant}_tfds"
  config.data.mice = ()                           # () = every mouse in data_dir
  config.data.batch_size = 16 if variant == "demo" else 4
  config.data.eval_batch_size = 64 if variant == "demo" else 8
  config.model.emb_dim = 64 if variant == "demo" else 16
  config.model.num_heads = 2
  config.model.num_blocks = 2
  config.model.mlp_dim = 128 if variant == "demo" else 32
  config.model.patch_stride = 2 if variant == "demo" else 4
  return config
