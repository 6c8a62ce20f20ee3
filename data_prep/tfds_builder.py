"""The tensorflow-datasets builder that writes one mouse as TFRecord shards, one split per tier.

Layout: `<data_dir>/sensorium_mouse/<data_key>/1.0.0/` holds the tfds files
(`dataset_info.json`, `features.json`, `sensorium_mouse-<tier>.tfrecord-*`) and the per-mouse
tables of `v1t_jax.dataset_meta` (`mouse_meta.json`, `mouse_meta.npz`: unit ids, cortical
coordinates, every statistic, every meta/trials array, tier sizes, image shape, source name and
checksum). tfds writes into an `incomplete.*` folder and renames it only when every split and
the metadata are written, so a failed or interrupted run never leaves a dataset that looks
complete.

One example per trial, in file order within each tier (shuffling disabled):
  image (C, H, W) uint8 when lossless else the source dtype; responses (n,), behavior (3,),
  pupil_center (2,) in their source dtypes (raw bytes, read back bit-exact); trial (file number);
  image_id; trial_idx (text: an int or a hashed string).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from data_prep.sensorium_source import TIERS, MouseData
from v1t_jax import dataset_meta

_BYTES = tfds.features.Encoding.BYTES


class _DropMessage(logging.Filter):
  """Drops log records whose format string starts with `prefix`."""

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record):
    return not str(record.msg).startswith(self.prefix)


class MouseMetadata(tfds.core.Metadata):
  """Per-mouse tables saved beside the shards (inside tfds's atomic write)."""

  def __init__(self, info: dict | None = None, arrays: dict[str, np.ndarray] | None = None):
    super().__init__()
    self.info = info or {}
    self.arrays = arrays or {}

  def save_metadata(self, data_dir):
    with open(os.path.join(data_dir, dataset_meta.META_JSON), "w") as f:
      json.dump(self.info, f, indent=1, sort_keys=True)
    with open(os.path.join(data_dir, dataset_meta.META_NPZ), "wb") as f:
      np.savez(f, **self.arrays)

  def load_metadata(self, data_dir):
    meta = dataset_meta.load_mouse_dir(data_dir)
    self.info, self.arrays = meta.info, dict(meta.arrays)


def metadata_for(mouse: MouseData, checksum: str) -> MouseMetadata:
  arrays = {f"neurons/{k}": v for k, v in mouse.neurons.items()}
  arrays.update({f"trials/{k}": v for k, v in mouse.trials.items()})
  for field, sources in mouse.statistics.items():
    for source, stats in sources.items():
      for stat, value in stats.items():
        arrays[f"statistics/{field}/{source}/{stat}"] = value
  tiers = {t: int(np.sum(mouse.tiers == t)) for t in TIERS if np.any(mouse.tiers == t)}
  info = {
      "format_version": dataset_meta.FORMAT_VERSION,
      "data_key": mouse.data_key,
      "source_name": mouse.source_name,
      "source_sha256": checksum,
      "num_trials": mouse.num_trials,
      "num_neurons": mouse.num_neurons,
      "tiers": tiers,
      "image_shape": list(mouse.images.shape[1:]),
      "image_dtype": str(mouse.images.dtype),
      "image_source_dtype": mouse.image_source_dtype,
      "response_dtype": str(mouse.responses.dtype),
      "image_id_field": mouse.image_id_field,
      "trial_idx_hashed": mouse.trial_idx.dtype.kind in "US",
      "has_behavior": mouse.behavior is not None,
      "has_pupil_center": mouse.pupil_center is not None,
      "statistics_sources": {f: sorted(s) for f, s in mouse.statistics.items()},
  }
  return MouseMetadata(info, arrays)


class SensoriumMouse(tfds.core.GeneratorBasedBuilder):
  """One Sensorium / Franke mouse; the builder config name is its data_key."""

  VERSION = tfds.core.Version(dataset_meta.VERSION)
  RELEASE_NOTES = {dataset_meta.VERSION: "Sensorium 2022 / Franke 2022 static mouse, lossless."}

  def __init__(self, *, mouse: MouseData, checksum: str, data_dir: str):
    self._mouse = mouse
    self._checksum = checksum
    config = tfds.core.BuilderConfig(name=mouse.data_key, description=mouse.source_name)
    # Every mouse is a config made here; tfds warns "Using custom data configuration" for each.
    quiet = _DropMessage("Using custom data configuration")
    absl_logging.get_absl_logger().addFilter(quiet)
    try:
      super().__init__(data_dir=data_dir, config=config)
    finally:
      absl_logging.get_absl_logger().removeFilter(quiet)

  # A local conversion downloads nothing: no "Downloading and preparing dataset Unknown size"
  # and "downloaded and prepared" lines from tfds; data_prep.convert prints one line per mouse.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    m = self._mouse
    behavior = m.behavior if m.behavior is not None else np.zeros((1, 3), np.float32)
    pupil = m.pupil_center if m.pupil_center is not None else np.zeros((1, 2), np.float32)
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=m.images.shape[1:], dtype=m.images.dtype,
                                      encoding=_BYTES),
        "responses": tfds.features.Tensor(shape=(m.num_neurons,), dtype=m.responses.dtype,
                                          encoding=_BYTES),
        "behavior": tfds.features.Tensor(shape=(3,), dtype=behavior.dtype, encoding=_BYTES),
        "pupil_center": tfds.features.Tensor(shape=(2,), dtype=pupil.dtype, encoding=_BYTES),
        "trial": np.int64,
        "image_id": np.int64,
        "trial_idx": tfds.features.Text(),
    })
    return tfds.core.DatasetInfo(
        builder=self, features=features, disable_shuffling=True,
        metadata=metadata_for(m, self._checksum),
        description=f"Mouse {m.data_key} converted from {m.source_name}.")

  def _split_generators(self, dl_manager):
    del dl_manager
    return {t: self._generate_examples(t) for t in TIERS if np.any(self._mouse.tiers == t)}

  def _generate_examples(self, tier: str):
    m = self._mouse
    zeros3, zeros2 = np.zeros(3, np.float32), np.zeros(2, np.float32)
    for i in np.flatnonzero(m.tiers == tier):
      yield int(i), {
          "image": m.images[i],
          "responses": m.responses[i],
          "behavior": m.behavior[i] if m.behavior is not None else zeros3,
          "pupil_center": m.pupil_center[i] if m.pupil_center is not None else zeros2,
          "trial": int(i),
          "image_id": int(m.image_ids[i]),
          "trial_idx": str(m.trial_idx[i]),
      }
