"""Reads and validates one published mouse (a Sensorium / Franke zip, or its unzipped folder).

Tolerant where the real files are [unknown] (`sensorium_format.md` §10): any numeric dtype,
extra meta files, any number of statistics source folders (`all` plus e.g. `stimulus_Frame`),
int or hashed-string `trial_idx` (or none), `frame_*` or `colorframeprojector_*` trial fields,
missing behaviour / pupil-centre folders. Strict where it matters: trial files numbered 0..N-1
with equal counts in every data folder, one shape per field, consistent neuron counts, finite
values. Every failure is a `SourceError` naming the source, the file and what was expected.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import os
import re
import struct
import threading
import zipfile
import zlib

import numpy as np
from absl import logging

TIERS = ("train", "validation", "test", "final_test")
DATA_FIELDS = ("images", "responses", "behavior", "pupil_center")
STAT_NAMES = ("mean", "std", "min", "max", "median")
IMAGE_ID_FIELDS = ("frame_image_id", "colorframeprojector_image_id")
READ_THREADS = 4
# Shape of one trial of each optional data field.
FIELD_SHAPES = {"behavior": (3,), "pupil_center": (2,)}


class SourceError(ValueError):
  """A source file is missing, unreadable or not what the Sensorium format says."""


_HEADERS: dict[bytes, tuple[np.dtype, tuple, bool]] = {}


def _parse_npy(data: bytes) -> np.ndarray:
  """np.load(allow_pickle=False) of an in-memory .npy, with the header parse cached.

  A mouse has ~24,000 trial files sharing a handful of headers; NumPy parses each header with
  ast.literal_eval, which costs more than reading the data.
  """
  if data[:6] != b"\x93NUMPY":
    raise ValueError("not a .npy file (bad magic)")
  start = 10 if data[6] == 1 else 12
  length = struct.unpack("<H" if data[6] == 1 else "<I", data[8:start])[0]
  header = data[:start + length]
  if header not in _HEADERS:
    stream = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(stream)
    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
      raise ValueError("object arrays need pickles, which the Sensorium loaders never allow")
    _HEADERS[header] = (dtype, shape, fortran)
  dtype, shape, fortran = _HEADERS[header]
  count = int(np.prod(shape))
  if len(data) - len(header) != count * dtype.itemsize:
    raise ValueError(f"expected {count * dtype.itemsize} data bytes, found {len(data) - len(header)}")
  array = np.frombuffer(data, dtype, count=count, offset=len(header))
  return array.reshape(shape, order="F" if fortran else "C")


class MouseSource:
  """File access to one dataset folder tree, inside a zip (read in place) or on disk."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self.is_zip = os.path.isfile(path)
    if self.is_zip:
      try:
        self._zip = zipfile.ZipFile(path)
        names = [n for n in self._zip.namelist() if not n.endswith("/")]
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise SourceError(f"{path}: not a readable zip file ({e}); expected a Sensorium "
                          "static*.zip (re-download it if it was truncated)") from e
      roots = {n.split("/", 1)[0] for n in names if "/" in n}
      if any(n.startswith(("data/", "meta/")) for n in names):
        self._prefix = ""
      elif len(roots) == 1:
        self._prefix = roots.pop() + "/"
      else:
        raise SourceError(f"{path}: expected one top-level folder holding data/ and meta/, "
                          f"found {sorted(roots)[:5]}")
      self._files = {n[len(self._prefix):] for n in names if n.startswith(self._prefix)}
      self._raw = open(path, "rb")
      self._lock = threading.Lock()
      self.name = os.path.basename(path)[:-4] if path.endswith(".zip") else os.path.basename(path)
    elif os.path.isdir(path):
      root = path
      if not os.path.isdir(os.path.join(root, "data")):
        children = [c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c, "data"))]
        if len(children) != 1:
          raise SourceError(f"{path}: expected a folder holding data/ and meta/ (or one folder "
                            "that does)")
        root = os.path.join(root, children[0])
      self._root = root
      self._files = set()
      for dirpath, _, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for f in filenames:
          self._files.add(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
      self.name = os.path.basename(os.path.normpath(root))
    else:
      raise SourceError(f"{path}: no such zip file or folder")

  # --- raw access -------------------------------------------------------------------------

  def exists(self, rel: str) -> bool:
    return rel in self._files

  def listdir(self, folder: str) -> list[str]:
    """Names directly inside `folder` (files and sub-folders)."""
    prefix = folder.rstrip("/") + "/"
    return sorted({f[len(prefix):].split("/", 1)[0] for f in self._files if f.startswith(prefix)})

  def _read_member(self, rel: str) -> bytes:
    """One zip member, decompressed outside any lock (zlib releases the GIL, so reader threads
    run in parallel; zipfile's own reader serialises them)."""
    info = self._zip.getinfo(self._prefix + rel)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 1:
      return self._zip.read(info)
    with self._lock:
      self._raw.seek(info.header_offset)
      header = self._raw.read(30)
      if header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {rel}")
      name_len, extra_len = struct.unpack("<HH", header[26:30])
      self._raw.seek(info.header_offset + 30 + name_len + extra_len)
      raw = self._raw.read(info.compress_size)
    data = raw if info.compress_type == zipfile.ZIP_STORED else zlib.decompress(raw, -15)
    if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
      raise zipfile.BadZipFile(f"CRC or size mismatch for {rel}")
    return data

  def read_bytes(self, rel: str) -> bytes:
    if rel not in self._files:
      raise SourceError(f"{self.name}: missing file {rel}")
    try:
      if self.is_zip:
        return self._read_member(rel)
      with open(os.path.join(self._root, rel), "rb") as f:
        return f.read()
    except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile, zlib.error) as e:
      raise SourceError(f"{self.name}: cannot read {rel} ({e}); the zip may be truncated or "
                        "corrupt") from e

  def load(self, rel: str) -> np.ndarray:
    """np.load without pickles, as every Sensorium loader does."""
    data = self.read_bytes(rel)
    try:
      return _parse_npy(data)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
      raise SourceError(f"{self.name}: {rel} is not a readable .npy array ({e})") from e

  def checksum(self) -> str:
    """sha256 of the zip file, or of every file (path and content) of a folder."""
    h = hashlib.sha256()
    if self.is_zip:
      with open(self.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
          h.update(block)
    else:
      for rel in sorted(self._files):
        h.update(rel.encode() + b"\0")
        h.update(self.read_bytes(rel))
    return h.hexdigest()

  def close(self):
    if self.is_zip:
      self._zip.close()
      self._raw.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  @property
  def data_key(self) -> str:
    """The sinzlab data_key rule (sensorium_format.md §1)."""
    for kind in ("GrayImageNet", "ColorImageNet"):
      m = re.search(rf".*static(.+?)-{kind}", self.name)
      if m:
        return m.group(1)
    ids = [self.load(f"meta/neurons/{f}.npy")[0] for f in ("animal_ids", "sessions", "scan_idx")]
    return "-".join(str(v) for v in ids)


@dataclasses.dataclass
class MouseData:
  """Everything of one mouse, validated, in file order. Arrays keep their source values."""
  data_key: str
  source_name: str
  images: np.ndarray            # (N, C, H, W), uint8 when every source pixel is an integer 0-255
  image_source_dtype: str
  responses: np.ndarray         # (N, n)
  behavior: np.ndarray | None   # (N, 3)
  pupil_center: np.ndarray | None  # (N, 2)
  tiers: np.ndarray             # (N,) str
  image_ids: np.ndarray         # (N,) int64
  trial_idx: np.ndarray         # (N,) int64 or str (hashed)
  image_id_field: str
  neurons: dict[str, np.ndarray]
  trials: dict[str, np.ndarray]
  statistics: dict[str, dict[str, dict[str, np.ndarray]]]   # field -> source -> stat -> array

  @property
  def num_trials(self) -> int:
    return self.tiers.shape[0]

  @property
  def num_neurons(self) -> int:
    return self.responses.shape[1]


def _numeric(name: str, rel: str, a: np.ndarray):
  if a.dtype.kind not in "biuf":
    raise SourceError(f"{name}: {rel} has dtype {a.dtype}; expected a numeric array")


def _trial_count(src: MouseSource, field: str) -> int:
  names = src.listdir(f"data/{field}")
  expected = {f"{i}.npy" for i in range(len(names))}
  if set(names) != expected:
    odd = sorted(set(names) - expected, key=lambda s: (len(s), s))[:5]
    missing = sorted(expected - set(names), key=lambda s: (len(s), s))[:5]
    raise SourceError(f"{src.name}: data/{field}/ must hold exactly 0.npy..{len(names) - 1}.npy "
                      f"(and nothing else); unexpected {odd}, missing {missing}")
  return len(names)


def _stack_trials(src: MouseSource, field: str, n: int, shape: tuple | None,
                  compact: bool = False) -> np.ndarray:
  """Loads data/<field>/<i>.npy for all i; one shape for all, numeric, finite.

  Files are read and checked by a few threads (zlib and NumPy release the GIL; decompression
  dominates). With `compact`, the result is uint8 when every value is an integer in 0-255
  (checked per trial as it arrives), else the source dtype: lossless either way.
  """
  rels = [f"data/{field}/{i}.npy" for i in range(n)]

  def load_checked(rel):
    a = src.load(rel)
    _numeric(src.name, rel, a)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
      raise SourceError(f"{src.name}: {rel} contains NaN or inf; expected finite values")
    return a, (lossless_uint8(a) if compact else None)

  with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
    results = pool.map(load_checked, rels)
    first, first_small = next(results)
    want = first.shape if shape is None else shape
    out = np.empty((n,) + tuple(want), np.uint8 if first_small is not None else first.dtype)
    for i, (rel, (a, small)) in enumerate(zip(rels, itertools.chain([(first, first_small)],
                                                                    results))):
      if a.shape != tuple(want):
        raise SourceError(f"{src.name}: {rel} has shape {a.shape}; expected {tuple(want)} "
                          f"(the shape of data/{field}/0.npy and of every other trial)")
      if out.dtype == np.uint8 and small is None and a.dtype != np.uint8:
        out = out.astype(a.dtype)   # the first trial that is not lossless as uint8
      elif out.dtype != np.uint8 and a.dtype != out.dtype:
        out = out.astype(np.result_type(out.dtype, a.dtype))   # mixed dtypes: promote
      out[i] = small if out.dtype == np.uint8 and small is not None else a
  return out


def _meta_arrays(src: MouseSource, folder: str, length: int, what: str) -> dict[str, np.ndarray]:
  out = {}
  for name in src.listdir(folder):
    if not name.endswith(".npy"):
      continue
    rel = f"{folder}/{name}"
    try:
      a = src.load(rel)
    except SourceError as e:
      logging.warning("skipping unreadable optional meta file: %s", e)
      continue
    if a.ndim == 0 or a.shape[0] != length:
      raise SourceError(f"{src.name}: {rel} has shape {a.shape}; expected a first dimension of "
                        f"{length} (one row per {what})")
    out[name[:-4]] = a
  return out


def _statistics(src: MouseSource, fields: list[str], shapes: dict[str, tuple]) -> dict:
  stats: dict[str, dict[str, dict[str, np.ndarray]]] = {}
  for field in fields:
    sources = src.listdir(f"meta/statistics/{field}")
    if "all" not in sources:
      raise SourceError(f"{src.name}: missing meta/statistics/{field}/all/ (the loaders read "
                        f"{', '.join(STAT_NAMES)} from it)")
    stats[field] = {}
    for source in sources:
      stats[field][source] = {}
      for stat in STAT_NAMES:
        rel = f"meta/statistics/{field}/{source}/{stat}.npy"
        if not src.exists(rel):
          if source == "all":
            raise SourceError(f"{src.name}: missing file {rel}")
          continue
        a = src.load(rel)
        _numeric(src.name, rel, a)
        ok = a.size == 1 if field == "images" else a.shape == shapes[field]
        if field == "images":
          ok = ok or a.size == shapes["images"][0]  # per-channel image statistics
        if not ok:
          expected = "a scalar" if field == "images" else str(shapes[field])
          raise SourceError(f"{src.name}: {rel} has shape {a.shape}; expected {expected}")
        stats[field][source][stat] = a
  return stats


def lossless_uint8(a: np.ndarray) -> np.ndarray | None:
  """`a` as uint8 when every value is an integer in 0-255 (then nothing is lost), else None."""
  if a.dtype == np.uint8:
    return a
  with np.errstate(invalid="ignore"):   # out-of-range or fractional values do not survive
    small = a.astype(np.uint8)
  return small if np.array_equal(small, a) else None


def read_mouse(src: MouseSource) -> MouseData:
  """Loads and validates every file the converter needs; raises SourceError on the first problem."""
  for required in ("images", "responses"):
    if not src.listdir(f"data/{required}"):
      raise SourceError(f"{src.name}: missing folder data/{required}/ (expected one .npy per trial)")
  present = [f for f in DATA_FIELDS if src.listdir(f"data/{f}")]
  counts = {f: _trial_count(src, f) for f in present}
  if len(set(counts.values())) != 1:
    raise SourceError(f"{src.name}: trial counts differ between data folders: {counts}; every "
                      "folder must hold one file per trial")
  n = counts["images"]

  unit_rel = "meta/neurons/unit_ids.npy"
  unit_ids = src.load(unit_rel)
  if unit_ids.ndim != 1:
    raise SourceError(f"{src.name}: {unit_rel} has shape {unit_ids.shape}; expected (n,)")
  n_neurons = unit_ids.shape[0]
  neurons = _meta_arrays(src, "meta/neurons", n_neurons, "neuron")
  coords = neurons.get("cell_motor_coordinates")
  if coords is None:
    raise SourceError(f"{src.name}: missing file meta/neurons/cell_motor_coordinates.npy")
  if coords.ndim != 2 or coords.shape[1] < 2:
    raise SourceError(f"{src.name}: meta/neurons/cell_motor_coordinates.npy has shape "
                      f"{coords.shape}; expected ({n_neurons}, 3)")
  trials = _meta_arrays(src, "meta/trials", n, "trial")
  if "tiers" not in trials:
    raise SourceError(f"{src.name}: missing file meta/trials/tiers.npy")
  tiers = trials["tiers"].astype(str)
  unknown = sorted(set(tiers) - set(TIERS))
  if unknown:
    raise SourceError(f"{src.name}: meta/trials/tiers.npy holds {unknown}; expected only {TIERS}")
  id_field = next((f for f in IMAGE_ID_FIELDS if f in trials), None)
  if id_field is None:
    raise SourceError(f"{src.name}: missing meta/trials/frame_image_id.npy (or "
                      "colorframeprojector_image_id.npy for Franke data)")
  image_ids = trials[id_field]
  if image_ids.dtype.kind not in "iuf" or np.any(image_ids != np.round(image_ids)):
    raise SourceError(f"{src.name}: meta/trials/{id_field}.npy must hold integer image ids")
  trial_idx = trials.get("trial_idx")
  if trial_idx is None:   # [unknown] whether every release has it; file order is the fallback
    logging.warning("%s: no meta/trials/trial_idx.npy; using the file order", src.name)
    trial_idx = np.arange(n)

  source_dtype = str(src.load("data/images/0.npy").dtype)
  images = _stack_trials(src, "images", n, None, compact=True)
  if images.ndim != 4:
    raise SourceError(f"{src.name}: data/images/0.npy has shape {images.shape[1:]}; expected "
                      "(channels, height, width), e.g. (1, 144, 256)")
  responses = _stack_trials(src, "responses", n, (n_neurons,))
  behavior = _stack_trials(src, "behavior", n, (3,)) if "behavior" in counts else None
  pupil = _stack_trials(src, "pupil_center", n, (2,)) if "pupil_center" in counts else None

  shapes = {"images": (images.shape[1],), "responses": (n_neurons,), **FIELD_SHAPES}
  stats = _statistics(src, ["images", "responses"] + [f for f in FIELD_SHAPES if f in counts],
                      shapes)
  return MouseData(
      data_key=src.data_key, source_name=os.path.basename(src.path),
      images=images, image_source_dtype=source_dtype,
      responses=responses, behavior=behavior, pupil_center=pupil, tiers=tiers,
      image_ids=image_ids.astype(np.int64), trial_idx=trial_idx, image_id_field=id_field,
      neurons=neurons, trials=trials, statistics=stats)
