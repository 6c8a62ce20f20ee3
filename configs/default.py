"""V1T as in the original's README run on Sensorium+ (six mice S1, A-E; behavior_mode 3, batch 16).

Every default follows `model_spec.md` §12. Data-derived shapes (neuron counts, coordinates,
statistics) come from the converted dataset at run time, never from this file.

  python launch_train.py --config=configs/default.py --workdir=runs/v1t_default \
      --config.data.data_dir=data/sensorium_tfds
"""

import ml_collections

# V1T ids of the Sensorium zips (sensorium_format.md §1); either the id or the data_key may be used.
SENSORIUM_PLUS_MICE = ("S1", "A", "B", "C", "D", "E")


def data_config() -> ml_collections.ConfigDict:
  """Input pipeline settings shared by all configs."""
  d = ml_collections.ConfigDict()
  d.data_dir = "data/sensorium_tfds"   # output of `python -m data_prep.convert`
  d.mice = SENSORIUM_PLUS_MICE         # V1T ids (S0, S1, A-E, F-O) or data keys like "21067-10-18"
  d.batch_size = 16                    # per mouse; a step sees [num_mice, batch_size, ...]
  d.eval_batch_size = 64               # per mouse, for validation / test passes
  d.center_crop = 1.0                  # the original's --center_crop (1 = identity)
  d.resize_image = True                # the original's --resize_image: 144x256 -> 36x64
  d.image_size = (36, 64)              # resize target when resize_image
  d.gray_scale = False                 # Franke colour data: average the channels into one
  d.limit_data = ml_collections.config_dict.placeholder(int)  # cap on train trials per mouse
  d.shuffle_seed = 1234                # per-mouse shuffles derive from it
  # "passes": the original's epochs (a fresh shuffle of every mouse per epoch, partial last
  # batches); "stream": one endless shuffled stream per mouse in full batches (before issue 20).
  d.train_order = "passes"
  d.cache = True                       # keep the serialized train shards in memory after epoch 1
  return d


def stacked2d_config() -> ml_collections.ConfigDict:
  """The original's CNN core (`model.core="stacked2d"`): its flags and Stacked2dCore's defaults
  (v1t_jax/stacked2d.py; the Sensorium baseline of Lurz et al. 2021)."""
  s = ml_collections.ConfigDict()
  s.num_layers = 4
  s.dropout = 0.0                      # Dropout2d after every hidden layer but the last
  s.core_reg_input = 6.3831            # gamma_input: Laplace smoothness of the first conv
  s.core_reg_hidden = 0.0              # gamma_hidden: group sparsity (0 for depth-separable)
  s.linear = False                     # no ELU anywhere
  s.hidden_channels = 64
  s.input_kern = 9
  s.hidden_kern = 7
  s.skip = 0
  s.stride = 1
  s.final_nonlinearity = True
  s.elu_shift = (0.0, 0.0)
  s.bias = True
  s.momentum = 0.9                     # PyTorch's convention: weight of the new batch
  s.pad_input = False
  s.hidden_padding = ml_collections.config_dict.placeholder(int)   # None = kernel // 2
  s.batch_norm = True
  s.hidden_dilation = 1
  s.laplace_padding = ml_collections.config_dict.placeholder(int)  # None = 1
  s.stack = -1                         # output of the last layer only
  s.use_avg_reg = False
  s.depth_separable = True
  return s


def model_config() -> ml_collections.ConfigDict:
  """The core, readouts and shifters (model_spec.md §3-§7, §12)."""
  m = ml_collections.ConfigDict()
  m.core = "vit"                       # "vit" (the fields below) or "stacked2d" (m.stacked2d)
  m.stacked2d = stacked2d_config()
  # Core (ViT).
  m.patch_size = 8
  m.patch_stride = 1
  m.patch_mode = 0                     # 0: unfold + linear (original default), 1: conv
  m.emb_dim = 155                      # D; also the width of every attention head
  m.num_heads = 4
  m.num_blocks = 4
  m.mlp_dim = 488
  m.p_dropout = 0.0229                 # after patch + positional embedding
  m.t_dropout = 0.2544                 # attention probabilities, attention output, MLP
  m.drop_path = 0.0
  m.use_lsa = False                    # Locality Self-Attention
  m.disable_bias = False
  m.behavior_mode = 3                  # 0 none, 1 image channels, 2/3 shared B-MLP, 4 per-mouse B-MLP
  # Readout and shifter.
  m.shift_mode = 2                     # 0 no shifter, 2 per-mouse core shifter (original default)
  m.disable_grid_predictor = False
  m.grid_predictor_dim = 2
  m.bias_mode = 0                      # 0 zeros, 1 mean response, 2 mean / std
  m.init_sigma = 0.1
  m.init_mu_range = 0.3
  # Regularisers and loss.
  m.core_reg_scale = 0.5379
  m.readout_reg_scale = 0.0076
  m.shifter_reg_scale = 0.0
  m.ds_scale = True                    # scale each mouse's loss by sqrt(N_train / batch)
  # Accelerator path.
  m.compute_dtype = "float32"          # "bfloat16": bf16 matmul operands, float32 accumulation
  # "explicit": softmax attention as written in model_spec.md §3.2. "fused": flash attention, our
  # Pallas kernel with dropout inside when training on a GPU, else cuDNN / XLA (no dropout: an
  # error while training with t_dropout > 0 off GPU). Same model either way.
  m.attention = "explicit"
  return m


def train_config() -> ml_collections.ConfigDict:
  """Optimizer, schedule and bookkeeping (model_spec.md §8)."""
  t = ml_collections.ConfigDict()
  t.num_epochs = 400                   # maximum; the plateau rule usually stops first
  t.lr = 0.001647
  t.core_lr = ml_collections.config_dict.placeholder(float)  # None = lr
  t.adam_beta1 = 0.9
  t.adam_beta2 = 0.9999
  t.adam_eps = 1e-8
  t.lr_patience = 10                   # the original's Scheduler (hard-coded there)
  t.lr_factor = 0.3
  t.max_reduce = 2
  # Not in the original (0 = off): the lr falls linearly to 0 over the last N of num_epochs, on
  # top of the plateau rule's factor. For short runs that end by max epochs (the demo).
  t.lr_decay_epochs = 0
  t.pretrain_core = ""                 # run dir whose best core is loaded and frozen; "" = train it
  # Activation memory (same results; docs/benchmarks.md): what each ViT block keeps for the
  # backward pass, "none" (everything), "attention" (probabilities and dropout masks) or "block"
  # (nothing, all recomputed); and the number of slices each step's batch is split into for
  # gradient accumulation (must divide data.batch_size).
  t.remat = "none"
  t.microbatches = 4
  # Members trained side by side in one program (a leading member axis, vmapped), differing only
  # in their seed (seed + k); evaluation and predictions use the members' average.
  t.ensemble_size = 1
  t.checkpoint_every_steps = 1000      # latest-state checkpoints within an epoch (0 = epoch ends)
  t.log_every_steps = 50
  t.max_steps_per_epoch = ml_collections.config_dict.placeholder(int)  # cap (smoke tests)
  # TensorBoard figures (attention rollout, best neurons, readout positions; v1t_jax.figures)
  # every N epochs and of the best checkpoint at the end; 0 = none. Single-process runs only.
  t.figures_every_epochs = 10
  return t


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 1234
  config.data = data_config()
  config.model = model_config()
  config.train = train_config()
  config.mesh = ml_collections.ConfigDict()
  # Devices along the readouts' neuron axis (it must divide the device count and the largest
  # mouse's neuron count); the other devices split the batch. 1 = pure data parallelism.
  config.mesh.neuron_shards = 1
  config.eval = ml_collections.ConfigDict()
  config.eval.step = ml_collections.config_dict.placeholder(int)  # None = the best checkpoint
  return config
