"""Per-mouse core shifter (model_spec.md §5.1): pupil centre -> readout shift in grid units.

Only the readout ("core") shifter of shift_mode 2 is ported; the image shifter of shift_mode
1/3/4 only acts with center_crop < 1 and is rejected by `ModelConfig`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v1t_jax import layers

HIDDEN = 5  # the original's MLPShifter: 2 -> 5 -> 5 -> 2


class CoreShifter(nnx.Module):
  """Linear(2->5), tanh, Linear(5->5), tanh, Linear(5->2), tanh; PyTorch default init, 57 params."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.fc1 = layers.torch_linear(2, HIDDEN, rngs=rngs)
    self.fc2 = layers.torch_linear(HIDDEN, HIDDEN, rngs=rngs)
    self.fc3 = layers.torch_linear(HIDDEN, 2, rngs=rngs)

  def __call__(self, pupil_center_Bx2: jax.Array) -> jax.Array:
    h = jnp.tanh(self.fc1(pupil_center_Bx2))
    h = jnp.tanh(self.fc2(h))
    return jnp.tanh(self.fc3(h))


def make_shifters(num_mice: int, *, rngs: nnx.Rngs) -> CoreShifter:
  """All mice's shifters as one CoreShifter with a leading mouse axis."""
  return layers.stack_per_mouse(CoreShifter, num_mice, rngs)


def shifter_l1(shifters: CoreShifter) -> jax.Array:
  """[M] sum of |theta| over each mouse's shifter parameters."""
  leaves = jax.tree.leaves(nnx.state(shifters, nnx.Param))
  return sum(jnp.sum(jnp.abs(x).reshape(x.shape[0], -1), axis=1) for x in leaves)
