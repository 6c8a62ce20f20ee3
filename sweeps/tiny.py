"""The test-sized space (tests/test_sweep.py), for `configs/synthetic.py:tiny`.

`train.lr` 0 is the clearly bad choice (the weights never move), so that a median pruner
prunes deterministically; `data.shuffle_seed` varies the trials without changing the compiled
programs (only the data order), which keeps the tests fast.
"""


def get_space() -> dict:
  return {
      "train.lr": {"type": "categorical", "choices": [0.0, 0.02]},
      "data.shuffle_seed": {"type": "int", "low": 0, "high": 10_000},
  }
