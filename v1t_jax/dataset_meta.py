"""Per-mouse tables of a converted dataset, readable without TensorFlow.

`data_prep.convert` writes, beside each mouse's TFRecord shards, `mouse_meta.json` (sizes, dtypes,
source file and checksum) and `mouse_meta.npz` (`neurons/*`, `trials/*` and
`statistics/<field>/<source>/<stat>` arrays, exactly as in the source zip). This module finds the
mice of a data directory, resolves V1T mouse ids (S0, S1, A-E, F-O) or data keys, and gives the
normalisation constants of the original (`model_spec.md` §2.2, `sensorium_format.md` §6).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from etils import epath

BUILDER_NAME = "sensorium_mouse"
VERSION = "1.0.0"
FORMAT_VERSION = 1
META_JSON = "mouse_meta.json"
META_NPZ = "mouse_meta.npz"

# V1T's mouse ids (model_spec.md §2.1, sensorium_format.md §1).
V1T_IDS = {
    "26872-17-20": "S0", "27204-5-13": "S1", "21067-10-18": "A", "22846-10-16": "B",
    "23343-5-17": "C", "23656-14-22": "D", "23964-4-22": "E",
    "25311-10-26": "F", "25340-3-19": "G", "25704-2-12": "H", "25830-10-4": "I",
    "26085-6-3": "J", "26142-2-11": "K", "26426-18-13": "L", "26470-4-5": "M",
    "26644-6-2": "N", "26872-21-6": "O",
}
_BY_ID = {v: k for k, v in V1T_IDS.items()}


@dataclasses.dataclass(frozen=True)
class MouseMeta:
  """The tables of one converted mouse."""
  path: str                                   # the dataset version folder (holds the shards)
  info: dict
  arrays: dict[str, np.ndarray]

  @property
  def data_key(self) -> str:
    return self.info["data_key"]

  @property
  def name(self) -> str:
    """V1T id when the mouse is one of the published ones, else its data key."""
    return V1T_IDS.get(self.data_key, self.data_key)

  @property
  def num_neurons(self) -> int:
    return int(self.info["num_neurons"])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.info["image_shape"])

  def tier_size(self, tier: str) -> int:
    return int(self.info["tiers"].get(tier, 0))

  @property
  def unit_ids(self) -> np.ndarray:
    return self.arrays["neurons/unit_ids"]

  @property
  def coordinates(self) -> np.ndarray:
    return self.arrays["neurons/cell_motor_coordinates"].astype(np.float32)

  def stat(self, field: str, stat: str, source: str = "all") -> np.ndarray:
    return self.arrays[f"statistics/{field}/{source}/{stat}"]

  def trial_array(self, name: str) -> np.ndarray:
    return self.arrays[f"trials/{name}"]


@dataclasses.dataclass(frozen=True)
class Normalisation:
  """The original's per-field transforms: x_norm = (x - offset) * scale."""
  image_mean: np.ndarray      # scalar or (C,)
  image_std: np.ndarray
  response_precision: np.ndarray   # (n,)
  behavior_scale: np.ndarray       # (3,) 1/std, 0 where std is 0 (stimulus-only mice)
  pupil_mean: np.ndarray           # (2,)
  pupil_scale: np.ndarray          # (2,) 1/std, 0 where std is 0


def _safe_inverse(std: np.ndarray) -> np.ndarray:
  # The original divides by the std without a threshold (NaN for the zeroed SENSORIUM mouse,
  # which it therefore never loads with behaviour). We give 0 instead, so such a mouse yields
  # all-zero behaviour inputs; the mouse's `has_behavior` flag tells the caller.
  std = std.astype(np.float64)
  return np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0).astype(np.float32)


def response_precision(std: np.ndarray) -> np.ndarray:
  """1/s where s > 1% of mean(s), else 1/(1% of mean(s)) (neuralpredictors 0.3.0 NeuroNormalizer)."""
  s = std.astype(np.float64)
  threshold = 0.01 * s.mean()
  return (1.0 / np.where(s > threshold, s, threshold)).astype(np.float32)


def normalisation(meta: MouseMeta) -> Normalisation:
  zeros3, zeros2 = np.zeros(3, np.float32), np.zeros(2, np.float32)
  has_b, has_p = meta.info["has_behavior"], meta.info["has_pupil_center"]
  return Normalisation(
      image_mean=np.asarray(meta.stat("images", "mean"), np.float32).reshape(-1),
      image_std=np.asarray(meta.stat("images", "std"), np.float32).reshape(-1),
      response_precision=response_precision(meta.stat("responses", "std")),
      behavior_scale=_safe_inverse(meta.stat("behavior", "std")) if has_b else zeros3,
      pupil_mean=np.asarray(meta.stat("pupil_center", "mean"), np.float32) if has_p else zeros2,
      pupil_scale=_safe_inverse(meta.stat("pupil_center", "std")) if has_p else zeros2,
  )


def checkpoint_record(meta: MouseMeta) -> dict:
  """What a checkpoint keeps of a mouse so that predictions need no dataset (JSON-able):
  neuron ids, the normalisation constants, and the raw means used as default behaviour inputs."""
  norm = normalisation(meta)
  has_b, has_p = meta.info["has_behavior"], meta.info["has_pupil_center"]
  return {
      "unit_ids": np.asarray(meta.unit_ids).astype(np.int64).tolist(),
      "image_shape": list(meta.image_shape),
      "has_behavior": bool(has_b), "has_pupil_center": bool(has_p),
      "normalisation": {f.name: np.asarray(getattr(norm, f.name), np.float64).reshape(-1).tolist()
                        for f in dataclasses.fields(norm)},
      "behavior_mean": (np.asarray(meta.stat("behavior", "mean"), np.float64).reshape(-1).tolist()
                        if has_b else [0.0] * 3),
      "pupil_center_mean": (np.asarray(meta.stat("pupil_center", "mean"), np.float64)
                            .reshape(-1).tolist() if has_p else [0.0] * 2),
  }


def mouse_dir(data_dir: str, data_key: str) -> str:
  return os.path.join(data_dir, BUILDER_NAME, data_key, VERSION)   # str: tfds and gs:// too


def is_complete(path: str) -> bool:
  """tfds renames the folder into place only once everything is written."""
  return all((epath.Path(path) / f).is_file()
             for f in ("dataset_info.json", META_JSON, META_NPZ))


def load_mouse_dir(path: str) -> MouseMeta:
  if not is_complete(path):
    raise FileNotFoundError(f"{path}: not a complete converted mouse (expected dataset_info.json, "
                            f"{META_JSON} and {META_NPZ}); run `python -m data_prep.convert`")
  info = json.loads((epath.Path(path) / META_JSON).read_text())
  with (epath.Path(path) / META_NPZ).open("rb") as f, np.load(f, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  return MouseMeta(path, info, arrays)


def available_mice(data_dir: str) -> list[str]:
  """Data keys of the complete mice in data_dir, in V1T order for the published ones."""
  root = epath.Path(data_dir) / BUILDER_NAME
  keys = [p.name for p in (root.iterdir() if root.is_dir() else [])
          if is_complete(mouse_dir(data_dir, p.name))]
  order = list(V1T_IDS)
  return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def resolve_mice(data_dir: str, names=()) -> list[MouseMeta]:
  """MouseMeta for each name (V1T id or data key); () = every converted mouse."""
  available = available_mice(data_dir)
  if not names:
    if not available:
      raise FileNotFoundError(f"{data_dir}: no converted mice (expected {BUILDER_NAME}/<data_key>/"
                              f"{VERSION}/); run `python -m data_prep.convert`")
    names = available
  out = []
  for name in names:
    key = _BY_ID.get(name, name)
    if key not in available:
      raise ValueError(f"mouse {name!r} is not in {data_dir} (converted mice: "
                       f"{[V1T_IDS.get(k, k) for k in available]})")
    out.append(load_mouse_dir(mouse_dir(data_dir, key)))
  return out
