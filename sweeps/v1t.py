"""The original V1T sweep of the ViT core, on our config names.

From bryanlimy/V1T `sweep_configs/sweep_vit.yaml` (W&B: `method: bayes`, metric `val_corr`
maximised, `early_terminate: hyperband, min_iter: 30`, 400 epochs). The closest run here:

  python -m v1t_jax.sweep --config=configs/default.py --space=sweeps/v1t.py \
      --study_dir=runs/sweep_v1t --trials=100 --sampler=tpe --pruner=hyperband \
      --prune_after_epochs=30 --config.data.data_dir=data/sensorium_tfds

The sweep's fixed values (adam_beta1 0.9, adam_beta2 0.9999, adam_eps 1e-8, bias_mode 0,
center_crop 1, criterion poisson, disable_grid_predictor false, ds_scale true, epochs 400,
grid_predictor_dim 2, readout gaussian2d, readout_reg_scale 0.0076, resize_image 1, seed 1234,
pretrain_core "") are the defaults of configs/default.py. Its batch size was set per agent
(`sweep.py --batch_size`; 16 or 4 in other versions of the file): `--config.data.batch_size`.
W&B's `q_log_uniform_values` (log-uniform, rounded to a multiple of q = 8) becomes a log-uniform
integer multiplier of 8 (Optuna allows no step with log). `uniform` stays uniform (not log).
"""


def get_space() -> dict:
  return {
      # --lr: uniform(1e-4, 0.1)
      "train.lr": {"type": "float", "low": 1e-4, "high": 0.1},
      # --core_lr_scale: uniform(1e-4, 1), the core's lr as a fraction of --lr (the original's
      # later --core_lr is absolute, as is our train.core_lr)
      "train.core_lr": {"type": "float", "low": 1e-4, "high": 1.0, "times": "train.lr"},
      # --core_reg_scale: uniform(0, 1)
      "model.core_reg_scale": {"type": "float", "low": 0.0, "high": 1.0},
      # --shifter_reg_scale: uniform(0, 1)
      "model.shifter_reg_scale": {"type": "float", "low": 0.0, "high": 1.0},
      # --emb_dim: q_log_uniform_values(8, 1024, q=8)
      "model.emb_dim": {"type": "int", "low": 1, "high": 128, "log": True, "times": 8},
      # --mlp_dim: q_log_uniform_values(8, 1024, q=8)
      "model.mlp_dim": {"type": "int", "low": 1, "high": 128, "log": True, "times": 8},
      # --num_blocks: int_uniform(1, 8)
      "model.num_blocks": {"type": "int", "low": 1, "high": 8},
      # --num_heads: int_uniform(2, 16)
      "model.num_heads": {"type": "int", "low": 2, "high": 16},
      # --patch_size: int_uniform(2, 16) (patch_stride stays 1, as in the sweep)
      "model.patch_size": {"type": "int", "low": 2, "high": 16},
      # --p_dropout, --t_dropout: uniform(0, 0.5)
      "model.p_dropout": {"type": "float", "low": 0.0, "high": 0.5},
      "model.t_dropout": {"type": "float", "low": 0.0, "high": 0.5},
      # --behavior_mode: {1, 2, 3}
      "model.behavior_mode": {"type": "categorical", "choices": [1, 2, 3]},
      # --shift_mode: {0, 1, 2, 3} in the original; 1 and 3 (the image shifter) are not ported
      # (v1t_jax/model.py), so only {0, 2}.
      "model.shift_mode": {"type": "categorical", "choices": [0, 2]},
  }
