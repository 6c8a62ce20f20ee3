"""Progress lines for long loops (training epochs, evaluation passes), printed on process 0."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np

PROGRESS_EVERY_S = 30.0   # default of `train.progress_every_s` (a config may set it)


class Progress:
  """A progress line every `every_s` seconds (process 0) while a loop runs: how far, the rate
  since the start and the time left, e.g.
  `epoch 3/17: step 40/106 (38%), 3.85 steps/s, ETA 0:00:17`. Nothing before `every_s` has
  passed, so short loops print nothing and logs are not flooded."""

  def __init__(self, what: str, total: int, unit: str = "step", done: int = 0,
               every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic):
    self.what, self.total, self.unit, self.every_s, self.clock = what, total, unit, every_s, clock
    self.start_done = done
    self.start = self.last = clock()

  def __call__(self, done: int, wait_for=None) -> bool:
    """Prints the line if it is due (after blocking on `wait_for`, so that the rate counts
    finished work); returns whether it printed."""
    now = self.clock()
    if now - self.last < self.every_s:
      return False
    if wait_for is not None:
      jax.block_until_ready(wait_for)
      now = self.clock()
    self.last = now
    rate = (done - self.start_done) / max(now - self.start, 1e-9)
    left = (self.total - done) / rate if rate > 0 else float("inf")
    say(f"{self.what}: {self.unit} {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%), "
         f"{rate:.3g} {self.unit}s/s, ETA {duration(left)}")
    return True


def duration(seconds: float) -> str:
  """H:MM:SS, or '?' when unknown (no progress yet)."""
  if not np.isfinite(seconds) or seconds > 1e7:
    return "?"
  minutes, secs = divmod(round(seconds), 60)
  return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def every_s(config) -> float:
  return float(config.train.get("progress_every_s", PROGRESS_EVERY_S))


def say(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)

