"""Print the model's trainable-parameter counts as one JSON line, without data or parameter memory.

  python -m v1t_jax.summary --config=configs/default.py --neurons=7538,8372,7344,7334,8107,8098
  -> {"core": 2465200, "readouts": 7487792, "shifters": 342, "total": 9953334}

Padding entries of the stacked per-mouse arrays are not counted. The model is built abstractly
(`nnx.eval_shape`), so the default config takes about a second.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from v1t_jax import cli, image_stage
from v1t_jax import model as v1t_model

SENSORIUM_HW = (144, 256)  # raw Sensorium frames (sensorium_format.md)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_NEURONS = flags.DEFINE_list("neurons", None, "Neurons per mouse, comma separated.")
_CHANNELS = flags.DEFINE_integer("channels", 1, "Image channels: 1 grey, 2 Franke colour.")
_RAW_HW = flags.DEFINE_list("raw_hw", list(map(str, SENSORIUM_HW)), "Raw image height,width.")


def abstract_model(
    config: v1t_model.ModelConfig, neuron_counts: Sequence[int], image_shape: Sequence[int]
) -> v1t_model.V1T:
  """The model with ShapeDtypeStruct leaves (no parameter memory, no data)."""
  coordinates = np.zeros((len(neuron_counts), max(neuron_counts), 3), np.float32)
  return nnx.eval_shape(lambda: v1t_model.V1T(
      config, neuron_counts=neuron_counts, coordinates=coordinates, image_shape=image_shape,
      response_mean=np.zeros(coordinates.shape[:2], np.float32),
      response_std=np.ones(coordinates.shape[:2], np.float32), rngs=nnx.Rngs(0)))


def main(argv: Sequence[str]) -> None:
  cli.no_positional(argv)
  if not _NEURONS.value:
    raise app.UsageError("--neurons is required, e.g. --neurons=7538,8372")
  config = _CONFIG.value
  data = config.data
  height, width = image_stage.output_hw(
      tuple(int(x) for x in _RAW_HW.value), data.center_crop,
      tuple(data.image_size) if data.resize_image else None)
  model = abstract_model(v1t_model.ModelConfig.from_config(config.model),
                         [int(n) for n in _NEURONS.value], (height, width, _CHANNELS.value))
  print(json.dumps(v1t_model.count_parameters(model)))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(main)
