"""The training objective (model_spec.md §7): Poisson loss with ds_scale plus L1 regularisers.

The original steps the optimizer once per round of K mouse-batches, each batch's objective
J_m = scaled Poisson loss + the FULL regulariser. One stacked [M, B, ...] step therefore
minimises sum_m J_m, so the core L1 term enters M times per step, as in the original.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from v1t_jax import readout, shifter
from v1t_jax.model import V1T

POISSON_EPS = float(np.finfo(np.float32).eps)  # 1.1920929e-07, added to prediction AND target


def poisson_loss(
    pred_MxBxN: jax.Array, target_MxBxN: jax.Array, mask_MxBxN: jax.Array
) -> jax.Array:
  """[M] sum over masked-in trials and neurons of (p + eps) - (y + eps) log(p + eps)."""
  pred, target = pred_MxBxN + POISSON_EPS, target_MxBxN + POISSON_EPS
  # where (not a product with the mask) keeps padded entries out of the values and gradients.
  return jnp.sum(jnp.where(mask_MxBxN, pred - target * jnp.log(pred), 0.0), axis=(1, 2))


def ds_scale(n_train: Sequence[int] | jax.Array, valid_MxB: jax.Array) -> jax.Array:
  """[M] sqrt(N_train_m / B_m), B_m = this batch's real trials of mouse m (its whole batch size)."""
  batch_M = jnp.maximum(jnp.sum(valid_MxB, axis=1), 1).astype(jnp.float32)
  return jnp.sqrt(jnp.asarray(n_train, jnp.float32) / batch_M)


def regularizers(model: V1T) -> dict[str, jax.Array]:
  """The terms of §7: core (scalar, the core's own weighted regulariser, e.g. core_reg_scale x
  L1 of the ViT), unweighted L1 sums readout [M] (features of real neurons) and shifter [M] (all
  shifter params; zeros without shifters)."""
  num_mice = len(model.neuron_counts)
  return {
      "core": model.core.regularizer(),
      "readout": readout.feature_l1(model.readouts, model.neuron_counts),
      "shifter": (jnp.zeros(num_mice) if model.shifters is None
                  else shifter.shifter_l1(model.shifters)),
  }


def regularizer(model: V1T) -> jax.Array:
  """[M] R_m: the scaled L1 terms of mouse m, the core term included in every mouse (§7)."""
  config, reg = model.config, regularizers(model)
  return (reg["core"] + config.readout_reg_scale * reg["readout"]
          + config.shifter_reg_scale * reg["shifter"])


def objective(
    model: V1T,
    batch: Mapping[str, jax.Array],
    n_train: Sequence[int] | jax.Array,
    *,
    train: bool = True,
    key: jax.Array | None = None,
    step_valid: jax.Array | None = None,
    regularize: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_m J_m for one stacked batch, with the scales of model.config.

  Args:
    batch: image, behavior, pupil_center, responses [M, B, N_max], valid [M, B] (data contract).
    n_train: training-set size per mouse (also used for the validation loss, as the original).
    train, key: forwarded to the model (dropout and readout sampling when train).
    step_valid: [M, B_step] valid flags of the whole step when `batch` is one microbatch of it
      (ds_scale counts the step's trials); None = batch["valid"].
    regularize: add the regularisers (a microbatched step adds them once, not per microbatch).

  Returns:
    (total, aux) with aux "poisson" [M] (after ds_scale, the original's logged loss), "reg" [M]
    (R_m, core term included in every mouse), "total" [M] (J_m), "pred" [M, B, N_max].
  """
  config = model.config
  pred, _ = model(batch["image"], batch["behavior"], batch["pupil_center"], train=train, key=key,
                  valid_MxB=batch["valid"])
  valid_MxB = batch["valid"]
  mask_MxBxN = valid_MxB[:, :, None] & model.neuron_mask[:, None, :]
  poisson_M = poisson_loss(pred, batch["responses"], mask_MxBxN)
  if config.ds_scale:
    poisson_M = poisson_M * ds_scale(n_train, valid_MxB if step_valid is None else step_valid)
  reg_M = regularizer(model) if regularize else jnp.zeros_like(poisson_M)
  total_M = poisson_M + reg_M
  return jnp.sum(total_M), {"poisson": poisson_M, "reg": reg_M, "total": total_M, "pred": pred}
