"""The synthetic demo: the `demo` preset of `data_prep.synthesize`, converted to TFRecord shards.

  python launch_train.py --config=configs/synthetic.py --workdir=runs/demo

On first use the preset's zips are written to `synthetic.zip_dir` and converted into
`data.data_dir`. The model is a small V1T (same architecture, fewer and narrower blocks, larger
patches at a coarser stride) so that it trains to a useful result in minutes on 2 CPU cores.
`:tiny` selects the test-sized variant (the `tiny` preset, a one-block 16-wide model, a few steps
per epoch).
`:color` is the demo on Franke-style colour mice (UV + green 2x36x64 images, written with
`synthesize --color`); add `--config.data.gray_scale=True` for the original's --gray_scale.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "demo"
  if variant not in ("demo", "tiny", "color"):
    raise ValueError(f"configs/synthetic.py takes ':demo', ':tiny' or ':color', got {arg!r}")
  demo = variant != "tiny"
  config = default.get_config()
  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.preset = "demo" if demo else "tiny"   # data_prep.synthesize preset
  config.synthetic.color = variant == "color"     # Franke-style UV + green images
  config.synthetic.seed = 0
  config.synthetic.zip_dir = f"data/synthetic_{variant}_zips"
  config.data.data_dir = f"data/synthetic_{variant}_tfds"
  config.data.mice = ()                           # () = every mouse in data_dir
  # Demo: batch 32 costs ~1.5x a step of 16 on 2 CPU cores (small matmuls, overhead-bound), and
  # lr 1e-2 learns much faster than the original's 1.6e-3 (validation correlation after 3 epochs:
  # 0.194 at 1e-2, 0.150 at 3e-3, 0.145 at 5e-3; 2e-2 diverges; docs/benchmarks.md). A patience
  # of 2 epochs lets the plateau rule cut it (and reload the best weights) within the short run.
  config.data.batch_size = 32 if demo else 4
  config.data.eval_batch_size = 64 if demo else 8
  config.train.microbatches = 1                   # small models: no activation memory to save
  m = config.model
  # Demo: one head (of width emb_dim, as in the original) and width 32. With 6x6 patches a
  # 96-example step took 0.27 s on 2 cores, against 0.39-0.44 s at width 64 and 0.65 s with two
  # heads of 64; per epoch the narrow model learns nearly as much (docs/benchmarks.md).
  m.emb_dim = 32 if demo else 16
  m.num_heads = 1 if demo else 2
  # Tiny: one block, since the tests compile its steps many times (docs/benchmarks.md, "Test
  # suite"); cores of several blocks are tested in tests/test_vit.py and tests/test_model.py.
  m.num_blocks = 2 if demo else 1
  m.mlp_dim = 64 if demo else 32
  # Demo: 12x12 patches at stride 3 give a 9x18 grid of tokens (the tiny variant: 6x6 at
  # stride 6, 6x10); the original's find_shape factorises the token count into the true grid.
  # A patch that spans a simulated receptive field (Gabor filters, periods ~10 px) learns
  # far faster per epoch than 6x6 or 8x8 ones, and fewer tokens make a step cheaper: validation
  # correlation after 6 epochs .373 (6x6), .399 (8x8), .430 (12x12); ~40, ~31 and ~26 s per
  # epoch (docs/benchmarks.md, "Session 6"). Stride 4 (8x8: 8x15 tokens) learned much slower.
  m.patch_size = 12 if demo else 6
  m.patch_stride = 3 if demo else 6
  config.train.lr = 1e-2 if demo else config.train.lr
  config.train.lr_patience = 2 if demo else config.train.lr_patience
  if demo:
    # Where the demo differs from the original, for a short run (docs/benchmarks.md, "The
    # demo"): no dropout and no core L1 (regularisers slow the first epochs and this run stops
    # long before it could overfit; without attention dropout a step is also ~20% cheaper),
    # readout biases from the mean responses (bias_mode 2), and Adam's b2 0.999 instead of
    # 0.9999, whose second moments remember the large first gradients for ~10k steps (validation
    # correlation after 4 epochs 0.299 vs 0.262). In 25-epoch runs on a GPU the first four
    # changes took validation correlation at epoch 10 from 0.32 to 0.37 (oracle 0.52).
    m.t_dropout = m.p_dropout = 0.0
    m.core_reg_scale = 0.0
    m.bias_mode = 2
    config.train.adam_beta2 = 0.999
  # Demo: 17 epochs of ~26 s on 2 idle cores (the first ~65 s: compilation, reading the shards),
  # so that a fresh clone (install ~75 s, synthesis ~70 s, conversion ~30 s, final evaluation
  # ~10 s) finishes well within 15 minutes (docs/benchmarks.md). The lr falls linearly to 0 over
  # the last 7 epochs (not in the original, which ends by its plateau rule): in a short run that
  # ends by max epochs this gains ~0.02-0.03 of validation correlation (docs/benchmarks.md).
  # `--config.train.num_epochs=34` continues a finished demo run; the decay then covers epochs
  # 28-34, so the lr first returns to 1e-2.
  config.train.num_epochs = 17 if demo else 2
  config.train.lr_decay_epochs = 7 if demo else 0
  config.train.log_every_steps = 50 if demo else 1
  config.train.max_steps_per_epoch = None if demo else 3
  # No TensorBoard figures in the demo (they would add ~45 s at the end): make them afterwards
  # with `python -m v1t_jax.figures --workdir=runs/demo` (PNGs, ~25 s).
  config.train.figures_every_epochs = 0
  return config
