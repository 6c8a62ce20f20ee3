"""The original's learning-rate plateau rule and early stopping (`model_spec.md` §8.4).

Mode "max" on the validation single-trial correlation, patience 10, factor 0.3, at most 2
reductions, min_epochs 0:
  * strictly better than the best so far -> best = value, wait = 0, reductions = 0 (the counter
    resets), save the best checkpoint;
  * otherwise, if wait >= patience: stop when reductions >= max_reduce, else reductions += 1,
    reload the best weights (optimizer moments kept), lr *= factor, wait = 0;
  * otherwise wait += 1.
So the lr drops on the 11th consecutive epoch without improvement, and training stops after 2
drops with no improvement in between. Host-side Python only; its state is a small dict that goes
into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import enum


class Action(enum.Enum):
  IMPROVED = "improved"     # save as the new best
  WAIT = "wait"
  REDUCE = "reduce"         # reload the best weights, multiply the lr by `factor`
  STOP = "stop"


@dataclasses.dataclass
class Plateau:
  patience: int = 10
  factor: float = 0.3
  max_reduce: int = 2
  best: float = float("-inf")
  best_epoch: int = -1
  wait: int = 0
  num_reduce: int = 0
  lr_scale: float = 1.0     # product of the reductions so far

  def update(self, epoch: int, value: float) -> Action:
    if value > self.best:
      self.best, self.best_epoch = value, epoch
      self.wait = 0
      self.num_reduce = 0
      return Action.IMPROVED
    if self.wait >= self.patience:
      if self.num_reduce >= self.max_reduce:
        return Action.STOP
      self.num_reduce += 1
      self.lr_scale *= self.factor
      self.wait = 0
      return Action.REDUCE
    self.wait += 1
    return Action.WAIT

  def state(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_state(cls, state: dict) -> "Plateau":
    return cls(**state)
