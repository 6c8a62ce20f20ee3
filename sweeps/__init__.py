"""Search spaces for `python -m v1t_jax.sweep --space=sweeps/<name>.py` (see v1t_jax/sweep.py).

A space file defines `get_space() -> dict` mapping dotted config fields ("train.lr") to specs:
  {"type": "float", "low": 1e-4, "high": 1e-2, "log": False, "step": None}
  {"type": "int", "low": 1, "high": 8, "log": False, "step": 1}
  {"type": "categorical", "choices": [0, 2]}
and optionally "times" (float / int specs): the field gets the sampled value times a number, or
times another field's value (a float spec), e.g. a core learning rate as a fraction of `train.lr`.
"""
