"""tf.data input pipeline: converted TFRecord shards -> `[mice, batch, ...]` batches.

Every element is a dict of arrays with a leading mouse axis M and a per-mouse batch B:
  image         [M, B, H, W, C] float32  z-scored with the stored image statistics, then the
                                          original's center crop + resize (144x256 -> 36x64)
  responses     [M, B, N_max]   float32  raw response * per-neuron precision (1%-of-mean-std
                                          threshold), zero-padded to the largest mouse
  behavior      [M, B, 3]       float32  divided by its std, no centring
  pupil_center  [M, B, 2]       float32  z-scored
  valid         [M, B]          bool     False on evaluation padding rows
  trial         [M, B]          int64    file number of the trial in its zip (-1 on padding)
  image_id      [M, B]          int64    frame_image_id (groups repeats)

Training (data.train_order "passes", the original's CycleDataloaders): one epoch is
`max over mice of ceil(n_train / B)` steps; in every epoch each mouse starts a fresh shuffle of
its train tier, cut into batches of B with a last partial batch (completed with `valid=False`
rows, so the loss and ds_scale count its real trials only), and a mouse whose pass ends before
the epoch does starts another one; the rest of its last pass is dropped at the epoch's end.
"stream" (before issue 20): every mouse's shuffled tier repeated without epoch boundaries, in
full batches only. Evaluation reads each tier of each mouse in file order, nothing dropped;
shorter mice are padded with `valid=False` rows.

Every process reads only its own contiguous slice of every tier (`process_index` of
`process_count`), so the pipeline scales to a pod; the slices partition each tier exactly.
"""

from __future__ import annotations

import math
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from v1t_jax import dataset_meta, image_stage  # noqa: E402
from v1t_jax.dataset_meta import MouseMeta  # noqa: E402

tf.config.set_visible_devices([], "GPU")   # keep TensorFlow off the accelerators JAX uses

_BYTES_FIELDS = ("image", "responses", "behavior", "pupil_center")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only for the process layout; no device work here
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def host_slice(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Contiguous [start, end) of n examples for one process; the slices partition range(n)."""
  return n * process_index // process_count, n * (process_index + 1) // process_count


class MouseReader:
  """Reads and normalises the shards of one mouse."""

  def __init__(self, meta: MouseMeta, n_max: int, *, center_crop: float = 1.0,
               resize_image: bool = True, image_size=(36, 64), gray_scale: bool = False):
    self.meta = meta
    self.n_max = n_max
    self._info = tfds.builder_from_directory(meta.path).info
    features = self._info.features
    self._dtypes = {k: features[k].np_dtype for k in _BYTES_FIELDS}
    self._shapes = {k: tuple(features[k].shape) for k in _BYTES_FIELDS}
    c, h, w = self._shapes["image"]
    out_hw = tuple(image_size) if resize_image and (h, w) != tuple(image_size) else None
    a_y, a_x = image_stage.crop_resize_matrices((h, w), center_crop, out_hw)
    self._identity = out_hw is None and center_crop == 1.0
    self._a_y, self._a_x = tf.constant(a_y), tf.constant(a_x)
    self.output_hwc = (a_y.shape[0], a_x.shape[0], 1 if gray_scale else c)
    self._gray = gray_scale
    norm = dataset_meta.normalisation(meta)
    self._image_mean = tf.constant(norm.image_mean.reshape(-1, 1, 1))   # broadcast over [C, H, W]
    self._image_std = tf.constant(norm.image_std.reshape(-1, 1, 1))
    self._precision = tf.constant(norm.response_precision)
    self._behavior_scale = tf.constant(norm.behavior_scale)
    self._pupil_mean = tf.constant(norm.pupil_mean)
    self._pupil_scale = tf.constant(norm.pupil_scale)
    self._spec = {k: tf.io.FixedLenFeature([], tf.string) for k in _BYTES_FIELDS}
    self._spec.update(trial=tf.io.FixedLenFeature([], tf.int64),
                      image_id=tf.io.FixedLenFeature([], tf.int64))

  def records(self, tier: str, process_index: int, process_count: int) -> tf.data.Dataset:
    """Serialized examples of this process's slice of a tier, in file order."""
    n = self.meta.tier_size(tier)
    start, end = host_slice(n, process_index, process_count)
    if end <= start:
      return tf.data.Dataset.from_tensor_slices(tf.zeros([0], tf.string))
    instructions = self._info.splits[f"{tier}[{start}:{end}]"].file_instructions
    parts = [tf.data.TFRecordDataset(os.path.join(self.meta.path, os.path.basename(fi.filename)))
             .skip(fi.skip).take(fi.take) for fi in instructions]
    ds = parts[0]
    for p in parts[1:]:
      ds = ds.concatenate(p)
    return ds

  def _raw(self, parsed, key):
    x = tf.io.decode_raw(parsed[key], self._dtypes[key])
    return tf.cast(tf.reshape(x, (-1,) + self._shapes[key]), tf.float32)

  def decode(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """A batch of serialized examples -> normalised [B, ...] tensors (responses padded)."""
    parsed = tf.io.parse_example(serialized, self._spec)
    image = (self._raw(parsed, "image") - self._image_mean) / self._image_std   # [B, C, H, W]
    if self._identity:
      image = tf.transpose(image, [0, 2, 3, 1])
    else:
      image = tf.einsum("bchw,xw->bchx", image, self._a_x)
      image = tf.einsum("yh,bchx->byxc", self._a_y, image)
    if self._gray:   # Franke --gray_scale: channel mean after standardising
      image = tf.reduce_mean(image, axis=-1, keepdims=True)
    responses = self._raw(parsed, "responses") * self._precision
    responses = tf.pad(responses, [[0, 0], [0, self.n_max - self.meta.num_neurons]])
    batch = tf.shape(serialized)[0]
    return {
        "image": image,
        "responses": responses,
        "behavior": self._raw(parsed, "behavior") * self._behavior_scale,
        "pupil_center": (self._raw(parsed, "pupil_center") - self._pupil_mean) * self._pupil_scale,
        "valid": tf.ones([batch], tf.bool),
        "trial": parsed["trial"],
        "image_id": parsed["image_id"],
    }

  def padding_batch(self, batch_size: int) -> dict[str, tf.Tensor]:
    h, w, c = self.output_hwc
    return {
        "image": tf.zeros([batch_size, h, w, c]), "responses": tf.zeros([batch_size, self.n_max]),
        "behavior": tf.zeros([batch_size, 3]), "pupil_center": tf.zeros([batch_size, 2]),
        "valid": tf.zeros([batch_size], tf.bool),
        "trial": tf.fill([batch_size], tf.constant(-1, tf.int64)),
        "image_id": tf.fill([batch_size], tf.constant(-1, tf.int64)),
    }

  def complete_batches(self, ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Decoded batches of `ds` with a partial one completed by padding rows (valid False)."""
    pad = self.padding_batch(batch_size)

    def fill(b):
      k = batch_size - tf.shape(b["valid"])[0]
      return {key: tf.concat([v, pad[key][:k]], axis=0) for key, v in b.items()}

    return ds.map(fill)


def readers(mice: list[MouseMeta], data_cfg) -> list[MouseReader]:
  n_max = max(m.num_neurons for m in mice)
  out = [MouseReader(m, n_max, center_crop=data_cfg.center_crop,
                     resize_image=data_cfg.resize_image, image_size=tuple(data_cfg.image_size),
                     gray_scale=data_cfg.gray_scale) for m in mice]
  shapes = {r.meta.name: r.output_hwc for r in out}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"mice give different image shapes after crop/resize {shapes}; train them "
                     "in separate runs or set data.resize_image / data.gray_scale")
  return out


def _stack(*per_mouse):
  return {k: tf.stack([m[k] for m in per_mouse]) for k in per_mouse[0]}


def train_size(meta: MouseMeta, limit_data: int | None) -> int:
  n = meta.tier_size("train")
  return min(n, limit_data) if limit_data else n


def steps_per_epoch(mice: list[MouseMeta], batch_size: int, limit_data: int | None = None) -> int:
  """The original's CycleDataloaders length: max over mice of ceil(n_train / batch)."""
  return max(math.ceil(train_size(m, limit_data) / batch_size) for m in mice)


def _limit(records: tf.data.Dataset, meta: MouseMeta, limit: int, seed: int, start: int,
           end: int) -> tf.data.Dataset:
  """The original's --limit_data: a fixed random subset of train trials (default_rng(seed))."""
  n = meta.tier_size("train")
  keep = np.zeros(n, bool)
  keep[np.random.default_rng(seed).choice(n, size=min(limit, n), replace=False)] = True
  keep_local = tf.constant(keep[start:end])
  return records.enumerate().filter(lambda i, r: keep_local[i]).map(lambda i, r: r)


def train_dataset(mice: list[MouseMeta], data_cfg, *, process_index: int | None = None,
                  process_count: int | None = None, start_step: int = 0,
                  epoch_steps: int | None = None) -> tf.data.Dataset:
  """Endless [M, B_local, ...] training batches, B_local = batch_size / process_count.

  The order is a fixed function of `data.shuffle_seed`: batch k is the same in every run, and
  `start_step` skips the first batches (as serialized records, before any decoding) so a
  resumed run sees exactly the batches an uninterrupted one would. `epoch_steps` (default:
  `steps_per_epoch()`) sets the epoch boundaries of train_order "passes".
  """
  pi, pc = _process(process_index, process_count)
  if data_cfg.batch_size % pc:
    raise ValueError(f"data.batch_size={data_cfg.batch_size} must be divisible by the number of "
                     f"processes ({pc})")
  batch = data_cfg.batch_size // pc
  order = data_cfg.get("train_order", "passes")
  if order not in ("passes", "stream"):
    raise ValueError(f"data.train_order={order!r}: 'passes' or 'stream'")
  steps = epoch_steps or steps_per_epoch(mice, data_cfg.batch_size, data_cfg.limit_data)
  per_mouse = []
  for i, reader in enumerate(readers(mice, data_cfg)):
    records = reader.records("train", pi, pc)
    if data_cfg.limit_data:
      records = _limit(records, reader.meta, data_cfg.limit_data, data_cfg.shuffle_seed,
                       *host_slice(reader.meta.tier_size("train"), pi, pc))
    if data_cfg.cache:
      records = records.cache()
    n_local = max(1, train_size(reader.meta, data_cfg.limit_data) // pc + 1)
    seed = data_cfg.shuffle_seed + 1000 * i + pi
    if order == "stream":
      records = records.shuffle(n_local, seed=seed, reshuffle_each_iteration=True).repeat()
      ds = records.batch(batch, drop_remainder=True).skip(start_step)
      per_mouse.append(ds.map(reader.decode, num_parallel_calls=tf.data.AUTOTUNE))
      continue
    ds = _passes(records, n_local, batch, steps, seed, start_step)
    ds = ds.map(reader.decode, num_parallel_calls=tf.data.AUTOTUNE)
    per_mouse.append(reader.complete_batches(ds, batch))   # a pass's last batch is partial
  ds = tf.data.Dataset.zip(tuple(per_mouse)).map(_stack, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def _passes(records: tf.data.Dataset, n_local: int, batch: int, steps: int, seed: int,
            start_step: int) -> tf.data.Dataset:
  """Serialized batches of one mouse, `steps` per epoch: each epoch a fresh shuffled pass (its
  last batch partial), further passes while the epoch lasts, the unused rest dropped."""
  def one_pass(pass_seed):
    return records.shuffle(n_local, seed=pass_seed, reshuffle_each_iteration=False).batch(batch)

  def epoch(epoch_seed):   # pass p of the epoch shuffles with seed epoch_seed + p
    passes = tf.data.Dataset.range(steps).map(lambda p: epoch_seed + p)
    return passes.flat_map(one_pass).take(steps)

  start_epoch, skip = divmod(start_step, steps)
  return tf.data.Dataset.random(seed=seed).skip(start_epoch).flat_map(epoch).skip(skip)


def eval_dataset(mice: list[MouseMeta], tier: str, data_cfg, *, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[tf.data.Dataset, int]:
  """[M, B, ...] batches covering this process's slice of `tier` of every mouse exactly once.

  Returns the dataset and its number of batches (the same on every process, so hosts stay in
  step; a process with fewer trials gets padding batches).
  """
  pi, pc = _process(process_index, process_count)
  batch = data_cfg.eval_batch_size
  rs = readers(mice, data_cfg)
  # The largest slice of any mouse on any process sets the number of batches.
  num_batches = max(math.ceil(math.ceil(r.meta.tier_size(tier) / pc) / batch) for r in rs)
  per_mouse = []
  for reader in rs:
    start, end = host_slice(reader.meta.tier_size(tier), pi, pc)
    ds = reader.complete_batches(reader.records(tier, pi, pc).batch(batch).map(reader.decode),
                                 batch)
    pad = reader.padding_batch(batch)
    extra = num_batches - math.ceil((end - start) / batch)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(extra))
    per_mouse.append(ds)
  ds = tf.data.Dataset.zip(tuple(per_mouse)).map(_stack).prefetch(tf.data.AUTOTUNE)
  return ds, num_batches


def as_numpy(ds: tf.data.Dataset):
  return tfds.as_numpy(ds)


def summarize(mice: list[MouseMeta], data_cfg, timed_steps: int = 20) -> dict:
  """What a run will see: mice, sizes, batch shapes, and the measured train throughput."""
  import time
  ds = train_dataset(mice, data_cfg, process_index=0, process_count=1)
  it = iter(as_numpy(ds))
  batch = next(it)   # the first batch pays for pipeline start-up and the cache fill
  t0 = time.perf_counter()
  for _ in range(timed_steps):
    next(it)
  seconds = time.perf_counter() - t0
  examples = timed_steps * len(mice) * data_cfg.batch_size
  return {
      "mice": [{"name": m.name, "data_key": m.data_key, "neurons": m.num_neurons,
                "tiers": m.info["tiers"], "source": m.info["source_name"]} for m in mice],
      "steps_per_epoch": steps_per_epoch(mice, data_cfg.batch_size, data_cfg.limit_data),
      "batch": {k: [list(v.shape), str(v.dtype)] for k, v in batch.items()},
      "train_examples_per_s": round(examples / seconds, 1),
  }
