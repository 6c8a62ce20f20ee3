r"""Write synthetic mice in the exact Sensorium 2022 zip layout, from a simulated V1 population.

  python -m data_prep.synthesize --out data/synthetic_demo_zips --preset demo --seed 0
  python -m data_prep.synthesize --out data/sens_zips --preset sensorium --trials 1200
  python -m data_prep.synthesize --out data/franke_zips --preset demo --color

One zip per mouse, `static<animal>-<session>-<scan>-GrayImageNet-<hash>.zip` (or `ColorImageNet`
with `--color`), holding one top-level folder of the same name with `data/`, `meta/` and
`config.json`, exactly as `sensorium_format.md` §2-§4 and the checklist of §9 describe. The
noise-free ground-truth rates of every trial and the simulated population's parameters
(`population/<field>`, every field of `simulate.Population`) go next to the zip
(`<stem>.truth.npz`, outside it so the zip stays format-exact). Everything is a deterministic function of `--seed`: two runs write
byte-identical files.

Choices where the real files are [unknown] (sensorium_format.md §10), each written so that the
converter and the original's loaders accept them:
  * arrays are float32 (images hold integer grey levels 0-255 in float32), ints are int64 and
    strings NumPy unicode;
  * statistics are computed over the `train` tier and written to `all/` and to a second source
    folder (`stimulus_Frame`, or `stimulus_ColorFrameProjector` for colour data);
  * the zip uses DEFLATE with a directory entry for every folder and a fixed timestamp.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
import zipfile

import numpy as np
from absl import flags

from data_prep import simulate
from v1t_jax import cli

# One hash for every synthetic zip: the published zips share one too, and a reader can tell ours
# apart from the real `94c6ff995dac583098847cfecd43e7b6`.
SYNTHETIC_HASH = hashlib.md5(b"v1t_jax synthetic sensorium").hexdigest()
CHUNK_TRIALS = 256   # trials simulated at a time; part of the seed -> data mapping, keep fixed
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

# The Sensorium+ mice with their real data keys and neuron counts (sensorium_format.md §1, §5).
SENSORIUM_MICE = (
    ("26872-17-20", 7776), ("27204-5-13", 7538), ("21067-10-18", 8372), ("22846-10-16", 7344),
    ("23343-5-17", 7334), ("23656-14-22", 8107), ("23964-4-22", 8098),
)


@dataclasses.dataclass(frozen=True)
class Preset:
  mice: tuple[tuple[str, int], ...]   # (data_key, neurons)
  train: int                          # train trials per mouse (before per-mouse jitter)
  validation: int
  test_images: int                    # shared by all mice, each shown ~test_repeats times
  test_repeats: int
  competition: bool                   # first mouse = SENSORIUM (stimulus only), second = SENSORIUM+
  jitter: int = 0                     # per-mouse random change of the train count (real: 4466-4490)
  calibration_images: int = 600       # images used to set each neuron's noise level


PRESETS = {
    "tiny": Preset(mice=(("90001-1-1", 24), ("90002-2-3", 31), ("90003-4-5", 17)), train=40,
                   validation=12, test_images=6, test_repeats=3, competition=False,
                   calibration_images=120),
    "demo": Preset(mice=(("91001-1-1", 600), ("91002-2-3", 700), ("91003-4-5", 800)), train=4500,
                   validation=300, test_images=100, test_repeats=10, competition=False),
    "sensorium": Preset(mice=SENSORIUM_MICE, train=4472, validation=522, test_images=100,
                        test_repeats=10, competition=True, jitter=20),
}


@dataclasses.dataclass(frozen=True)
class TrialPlan:
  """Every trial of one mouse, in file order."""
  tiers: np.ndarray            # (N,) <U10
  image_ids: np.ndarray        # (N,) int64
  presentation: np.ndarray     # (N,) int64, the real presentation order (trial_idx)


def shared_image_ids(seed: int, preset: Preset) -> tuple[np.ndarray, np.ndarray]:
  """The test ids shown to every mouse and the final_test ids of the competition mice."""
  rng = np.random.default_rng([seed, 7])
  ids = rng.choice(np.arange(1, 8000), size=2 * preset.test_images, replace=False)
  return np.sort(ids[: preset.test_images]), np.sort(ids[preset.test_images:])


def plan_trials(seed: int, mouse_index: int, preset: Preset, n_train: int, n_val: int,
                competition: bool) -> TrialPlan:
  """Tiers and image ids in presentation order, then shuffled into file order (as published)."""
  rng = np.random.default_rng([seed, mouse_index, 11])
  test_ids, final_ids = shared_image_ids(seed, preset)
  # Train / validation images are unique to the mouse and shown once each.
  first = 10_000 + 100_000 * mouse_index
  own = first + rng.permutation(n_train + n_val)
  tiers = ["train"] * n_train + ["validation"] * n_val
  ids = list(own)

  def repeated(image_ids, tier):
    # About `test_repeats` presentations per image; a few images lose one (real: 989-999 of 1000).
    reps = np.full(image_ids.size, preset.test_repeats)
    if preset.test_repeats > 2:
      reps[rng.random(image_ids.size) < 0.05] -= 1
    tiers.extend([tier] * int(reps.sum()))
    ids.extend(np.repeat(image_ids, reps))

  repeated(test_ids, "test")
  if competition:
    repeated(final_ids, "final_test")
  tiers, ids = np.array(tiers, dtype="<U10"), np.array(ids, dtype=np.int64)
  order = rng.permutation(tiers.size)            # presentation order is random over tiers
  tiers, ids = tiers[order], ids[order]
  file_order = rng.permutation(tiers.size)       # file number carries no information
  presentation = np.empty(tiers.size, np.int64)
  presentation[file_order] = np.arange(tiers.size)
  return TrialPlan(tiers[file_order], ids[file_order], presentation)


def npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  return buf.getvalue()


class ZipTree:
  """Writes a dataset folder tree into a zip, with directory entries and fixed timestamps."""

  def __init__(self, path: str, root: str):
    self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1)
    self._root = root
    self._dirs: set[str] = set()

  def _add_dirs(self, rel: str):
    parts = rel.split("/")[:-1]
    for i in range(len(parts) + 1):
      d = "/".join([self._root] + parts[:i]) + "/"
      if d not in self._dirs:
        self._dirs.add(d)
        info = zipfile.ZipInfo(d, date_time=ZIP_DATE)
        info.external_attr = 0o40755 << 16
        self._zip.writestr(info, b"")

  def write(self, rel: str, data: bytes):
    self._add_dirs(rel)
    info = zipfile.ZipInfo(f"{self._root}/{rel}", date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    self._zip.writestr(info, data, compresslevel=1)

  def save(self, rel: str, array: np.ndarray):
    self.write(rel, npy_bytes(array))

  def close(self):
    self._zip.close()


def stats_of(values: np.ndarray, axis) -> dict[str, np.ndarray]:
  return {
      "mean": np.mean(values, axis=axis, dtype=np.float64).astype(np.float32),
      "std": np.std(values, axis=axis, dtype=np.float64).astype(np.float32),
      "min": np.min(values, axis=axis).astype(np.float32),
      "max": np.max(values, axis=axis).astype(np.float32),
      "median": np.median(values, axis=axis).astype(np.float32),
  }


def image_stats(hist: np.ndarray, total: float, total_sq: float, count: int):
  """Scalar image statistics from a histogram of integer grey levels (exact median, no big array)."""
  levels = np.flatnonzero(hist)
  cdf = np.cumsum(hist)
  # Sorted position k holds the smallest level whose cumulative count exceeds k.
  lo = np.searchsorted(cdf, (count - 1) // 2, side="right")
  hi = np.searchsorted(cdf, count // 2, side="right")
  median = (lo + hi) / 2
  mean = total / count
  return {
      "mean": np.float32(mean),
      "std": np.float32(np.sqrt(max(total_sq / count - mean * mean, 0.0))),
      "min": np.float32(levels[0]),
      "max": np.float32(levels[-1]),
      "median": np.float32(median),
  }


@dataclasses.dataclass(frozen=True)
class MouseSpec:
  index: int
  data_key: str
  neurons: int
  n_train: int
  n_val: int
  competition: bool       # withheld test / final_test responses, hashed trial_idx
  stimulus_only: bool     # zeroed behaviour and pupil centre (the SENSORIUM mouse)


def mouse_specs(preset: Preset, seed: int, trials: int | None) -> list[MouseSpec]:
  rng = np.random.default_rng([seed, 3])
  specs = []
  for i, (key, neurons) in enumerate(preset.mice):
    n_train, n_val = preset.train, preset.validation
    if trials is not None:   # --trials: train + validation per mouse, proportions kept
      n_val = max(1, round(trials * preset.validation / (preset.train + preset.validation)))
      n_train = max(1, trials - n_val)
    if preset.jitter:
      n_train = max(1, n_train + int(rng.integers(-preset.jitter, preset.jitter + 1)))
    competition = preset.competition and i < 2
    specs.append(MouseSpec(i, key, neurons, n_train, n_val, competition,
                           stimulus_only=competition and i == 0))
  return specs


def write_mouse(out_dir: str, spec: MouseSpec, preset: Preset, seed: int, color: bool) -> str:
  """Simulates one mouse and writes its zip (atomically) plus the ground-truth file."""
  kind = "ColorImageNet" if color else "GrayImageNet"
  stem = f"static{spec.data_key}-{kind}-{SYNTHETIC_HASH}"
  zip_path = os.path.join(out_dir, stem + ".zip")
  image_shape = (2, 36, 64) if color else (1, 144, 256)
  plan = plan_trials(seed, spec.index, preset, spec.n_train, spec.n_val, spec.competition)
  n = plan.tiers.size
  population = simulate.make_population(
      np.random.default_rng([seed, spec.index, 1]), spec.neurons, image_shape,
      n_calibration=preset.calibration_images)

  tmp_path = zip_path + ".partial"
  tree = ZipTree(tmp_path, stem)
  try:
    tree.write("config.json", json.dumps({"links": {}}).encode())
    responses = np.empty((n, spec.neurons), np.float32)
    rates = np.empty((n, spec.neurons), np.float32)
    behavior = np.empty((n, 3), np.float32)
    pupil = np.empty((n, 2), np.float32)
    train = plan.tiers == "train"
    hist, total, total_sq, count = np.zeros(256, np.int64), 0.0, 0.0, 0
    # Test images (~10 presentations each, spread over all chunks) are rendered once.
    ids, counts = np.unique(plan.image_ids, return_counts=True)
    shown_again = ids[counts > 1]
    repeated = dict(zip(shown_again.tolist(),
                        simulate.render_images(seed, shown_again, image_shape)))
    for c, start in enumerate(range(0, n, CHUNK_TRIALS)):
      sl = slice(start, min(start + CHUNK_TRIALS, n))
      rng = np.random.default_rng([seed, spec.index, 2, c])
      images = simulate.render_images(seed, plan.image_ids[sl], image_shape, repeated)
      behavior[sl], pupil[sl] = simulate.sample_behavior(rng, sl.stop - sl.start)
      rates[sl] = population.rates(images, behavior[sl], pupil[sl])
      responses[sl] = population.sample_responses(rng, rates[sl])
      for j, image in enumerate(images):
        tree.save(f"data/images/{start + j}.npy", image)
        if train[start + j]:
          hist += np.bincount(image.astype(np.int64).ravel(), minlength=256)[:256]
          total += float(image.sum(dtype=np.float64))
          total_sq += float(np.square(image, dtype=np.float64).sum())
          count += image.size

    # Statistics over the train tier, before anything is withheld (as the real ones must have been).
    stats = {
        "images": image_stats(hist, total, total_sq, count),
        "responses": stats_of(responses[train], axis=0),
        "behavior": stats_of(behavior[train], axis=0),
        "pupil_center": stats_of(pupil[train], axis=0),
    }
    withheld = np.isin(plan.tiers, ["test", "final_test"]) if spec.competition else np.zeros(n, bool)
    responses[withheld] = 0.0
    if spec.stimulus_only:
      behavior[:] = 0.0
      pupil[:] = 0.0
      for field in ("behavior", "pupil_center"):
        stats[field] = stats_of(np.zeros((1, 3 if field == "behavior" else 2), np.float32), 0)
    for i in range(n):
      tree.save(f"data/responses/{i}.npy", responses[i])
      tree.save(f"data/behavior/{i}.npy", behavior[i])
      tree.save(f"data/pupil_center/{i}.npy", pupil[i])

    second = "stimulus_ColorFrameProjector" if color else "stimulus_Frame"
    for field, values in stats.items():
      for source in ("all", second):
        for name, value in values.items():
          tree.save(f"meta/statistics/{field}/{source}/{name}.npy", value)
    write_neuron_meta(tree, spec, population, seed)
    write_trial_meta(tree, spec, plan, seed, color)
    tree.close()
  except BaseException:
    tree.close()
    os.remove(tmp_path)
    raise

  truth_path = os.path.join(out_dir, stem + ".truth.npz")
  params = {f"population/{f.name}": np.asarray(getattr(population, f.name))
            for f in dataclasses.fields(population)}
  np.savez(truth_path + ".partial.npz", rates=rates, tiers=plan.tiers, image_ids=plan.image_ids,
           withheld=withheld, **params)
  os.replace(truth_path + ".partial.npz", truth_path)
  os.replace(tmp_path, zip_path)   # the zip appears last and whole
  return zip_path


def write_neuron_meta(tree: ZipTree, spec: MouseSpec, population, seed: int):
  rng = np.random.default_rng([seed, spec.index, 4])
  # Unit ids increase from 1 with gaps, as in the real files ([1, 2, 4, 5, 6, ...]).
  unit_ids = 1 + np.sort(rng.choice(int(spec.neurons * 1.1) + 2, spec.neurons, replace=False))
  animal, session, scan = (int(v) for v in spec.data_key.split("-"))
  n = spec.neurons
  tree.save("meta/neurons/unit_ids.npy", unit_ids.astype(np.int64))
  tree.save("meta/neurons/cell_motor_coordinates.npy",
            population.cell_motor_coordinates.astype(np.float32))
  tree.save("meta/neurons/area.npy", np.full(n, "V1", dtype="<U2"))
  tree.save("meta/neurons/layer.npy", np.full(n, "L2/3", dtype="<U4"))
  tree.save("meta/neurons/animal_ids.npy", np.full(n, animal, np.int64))
  tree.save("meta/neurons/sessions.npy", np.full(n, session, np.int64))
  tree.save("meta/neurons/scan_idx.npy", np.full(n, scan, np.int64))


def write_trial_meta(tree: ZipTree, spec: MouseSpec, plan: TrialPlan, seed: int, color: bool):
  n = plan.tiers.size
  prefix = "colorframeprojector_" if color else "frame_"
  if spec.competition:   # hashed trial ids, 32 hex characters, as in the competition mice
    trial_idx = np.array([hashlib.md5(f"{seed}-{spec.data_key}-{t}".encode()).hexdigest()
                          for t in plan.presentation], dtype="<U32")
  else:
    trial_idx = plan.presentation
  start = np.datetime64("2020-01-01T09:00:00") + plan.presentation * np.timedelta64(900, "ms")
  # Whole seconds, as in the real files ("Timestamp('2020-01-01 09:43:22')"; the original's
  # parser expects no fraction): the clock of ~0.9 s trials, truncated.
  stamps = np.array([f"Timestamp('{str(t).replace('T', ' ')}')"
                     for t in start.astype("datetime64[s]")], dtype="<U40")
  animal, session, scan = (int(v) for v in spec.data_key.split("-"))
  tree.save("meta/trials/tiers.npy", plan.tiers)
  tree.save("meta/trials/trial_idx.npy", trial_idx)
  tree.save(f"meta/trials/{prefix}image_id.npy", plan.image_ids)
  tree.save(f"meta/trials/{prefix}image_class.npy", np.full(n, "imagenet", dtype="<U8"))
  tree.save(f"meta/trials/{prefix}trial_ts.npy", stamps)
  tree.save("meta/trials/animal_id.npy", np.full(n, animal, np.int64))
  tree.save("meta/trials/session.npy", np.full(n, session, np.int64))
  tree.save("meta/trials/scan_idx.npy", np.full(n, scan, np.int64))
  tree.save("meta/trials/condition_hash.npy",
            np.array([hashlib.sha1(str(i).encode()).hexdigest()[:20] for i in plan.image_ids],
                     dtype="<U20"))
  tree.save(f"meta/trials/{prefix}pre_blank_period.npy", np.full(n, 0.4, np.float64))
  tree.save(f"meta/trials/{prefix}presentation_time.npy", np.full(n, 0.5, np.float64))


def synthesize(out_dir: str, preset_name: str = "tiny", seed: int = 0, trials: int | None = None,
               color: bool = False, competition: bool | None = None,
               workers: int | None = 1) -> list[str]:
  """Writes every mouse of a preset; returns the zip paths. Existing complete zips are rewritten.

  workers: processes writing mice in parallel (None: one per mouse when there are at most twice
  as many mice as CPU cores, else one per core; 1: all in this process). Each mouse is a
  deterministic function of (seed, mouse index), so the files are the same whatever the number
  of workers.
  """
  if preset_name not in PRESETS:
    raise ValueError(f"unknown preset {preset_name!r}; expected one of {sorted(PRESETS)}")
  preset = PRESETS[preset_name]
  if competition is not None:
    preset = dataclasses.replace(preset, competition=competition)
  if color and preset.competition:
    raise ValueError("Franke colour data have no competition mice: use --color without "
                     "--competition (and not the 'sensorium' preset)")
  os.makedirs(out_dir, exist_ok=True)
  specs = mouse_specs(preset, seed, trials)
  if workers is None:
    # One process per mouse even beyond the core count: 3 mice on 2 cores finish together
    # (~1.5 mice of time) instead of 2 + 1 (2 mice of time, one core idle for the last).
    cores = os.cpu_count() or 1
    workers = len(specs) if len(specs) <= 2 * cores else cores
  workers = max(1, workers)
  if workers == 1 or len(specs) == 1:
    return [_write_and_report(out_dir, spec, preset, seed, color, len(specs)) for spec in specs]
  # Fresh interpreters ("spawn"): the caller may already run JAX or TensorFlow threads, which a
  # forked child would inherit in an unknown state. The simulation is NumPy on one core each.
  import concurrent.futures
  import multiprocessing
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    futures = [pool.submit(_write_and_report, out_dir, spec, preset, seed, color, len(specs))
               for spec in specs]
    return [f.result() for f in futures]


def _write_and_report(out_dir: str, spec: MouseSpec, preset: Preset, seed: int, color: bool,
                      num_mice: int) -> str:
  t0 = time.time()
  path = write_mouse(out_dir, spec, preset, seed, color)
  print(f"[{spec.index + 1}/{num_mice}] {os.path.basename(path)}: {spec.neurons} "
        f"neurons, {spec.n_train} train + {spec.n_val} validation trials in "
        f"{time.time() - t0:.1f} s", flush=True)
  return path


def define_flags():
  """The command line's flags, defined only when run as a program: importing this module (as
  data_prep.prepare does, in processes with flags of their own) defines none."""
  flags.DEFINE_string("out", None, "output folder for the zips", required=True)
  flags.DEFINE_enum("preset", "tiny", sorted(PRESETS), "dataset size")
  flags.DEFINE_integer("seed", 0, "random seed (the output is a deterministic function of it)")
  flags.DEFINE_integer("trials", None, "train + validation trials per mouse (shrinks a preset)")
  flags.DEFINE_bool("color", False, "Franke-style 2x36x64 ColorImageNet zips")
  flags.DEFINE_bool("competition", None,
                    "make the first two mice competition mice (default: on for 'sensorium')")
  flags.DEFINE_integer(
      "workers", None, "processes writing mice in parallel (default: one per mouse, or one per "
      "core when there are more than twice as many mice as cores)")


def main(argv):
  cli.no_positional(argv)
  f = flags.FLAGS
  paths = synthesize(f.out, f.preset, f.seed, f.trials, f.color, f.competition, f.workers)
  for p in paths:
    print(p, file=sys.stdout)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
