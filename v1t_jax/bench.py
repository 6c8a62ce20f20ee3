r"""Model benchmark: forward and train-step examples/s, FLOPs, MFU, compile time, peak memory.

  python -m v1t_jax.bench --config=configs/default.py --batch_size=16 --mice=6
  python -m v1t_jax.bench --config=configs/default.py --mice=1 --peak_gflops=234
  python -m v1t_jax.bench --config=configs/synthetic.py:tiny --set model.attention=fused

Batches are synthetic and live in memory, shaped like the pipeline's: image [M, B, H, W, C],
behavior [M, B, 3], pupil_center [M, B, 2], responses [M, B, N_max] (realistic neuron counts,
`--neurons`), valid [M, B]. The model and its optimizer state are built exactly as `train.Trainer`
builds them (from stand-in mouse tables with random cortical coordinates), and the measured
functions are the Trainer's own jitted `train.train_step` (same shardings, donated state) and
`train.eval_step` ("forward": eval-mode predictions, loss and correlation sums).

Prints one JSON line per measurement: what, examples_per_s (median of `--iters` timed calls
after `--warmup` untimed ones), gflop_per_example (the analytic formula `flops_per_example`; a
train step counts 3x the forward), xla_gflop_per_example (XLA's own cost analysis, a check),
gflops, mfu (against `--peak_gflops`), compile_s, peak_host_gib (peak RSS during the
measurement), peak_device_gib (accelerators), user_s / sys_s (CPU seconds of the timed calls),
device, and the config and batch. No TensorFlow and no ml_collections are needed: without
ml_collections the config file is read with a minimal stand-in for the two names it uses.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import ctypes.util
import importlib
import importlib.util
import json
import os
import platform
import resource
import sys
import time
import types
from collections.abc import Sequence

import numpy as np

from v1t_jax import allocator

SENSORIUM_PLUS_NEURONS = (7538, 8372, 7344, 7334, 8107, 8098)  # S1, A-E (model_spec.md §2.1)
N_TRAIN = 4500  # training trials per mouse for ds_scale (Sensorium+ mice have ~4,400-4,500)
GIB = 2.0**30


# ---------------------------------------------------------------------------------------------
# Config files, with or without ml_collections.


class _ConfigDict(dict):
  """The subset of ml_collections.ConfigDict the project's config files use: attribute access."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    for key, value in self.items():
      if isinstance(value, dict) and not isinstance(value, _ConfigDict):
        self[key] = _ConfigDict(value)

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  def __setattr__(self, name, value):
    self[name] = value

  def to_dict(self):
    return {k: v.to_dict() if isinstance(v, _ConfigDict) else v for k, v in self.items()}

  def to_json_best_effort(self):
    return json.dumps(self.to_dict(), default=str)


def _ml_collections_stand_in() -> types.ModuleType:
  module = types.ModuleType("ml_collections")
  module.ConfigDict = _ConfigDict
  module.config_dict = types.SimpleNamespace(placeholder=lambda *args, **kwargs: None)
  return module


@contextlib.contextmanager
def _config_modules():
  """Makes `import ml_collections` work inside config files, with a stand-in if it is missing."""
  try:
    importlib.import_module("ml_collections")
    yield
    return
  except ImportError:
    pass
  saved = {k: v for k, v in sys.modules.items() if k == "configs" or k.startswith("configs.")}
  for k in saved:   # config modules imported with the real package are imported again
    del sys.modules[k]
  sys.modules["ml_collections"] = _ml_collections_stand_in()
  try:
    yield
  finally:
    del sys.modules["ml_collections"]
    for k in [k for k in sys.modules if k == "configs" or k.startswith("configs.")]:
      del sys.modules[k]   # config modules bound to the stand-in are not kept
    sys.modules.update(saved)


def load_config(spec: str):
  """`path/to/config.py[:arg]` -> its get_config(arg), a ConfigDict (real or stand-in)."""
  path, _, arg = spec.partition(":")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:   # config files import `configs.default`
    sys.path.insert(0, root)
  with _config_modules():
    module_spec = importlib.util.spec_from_file_location("_bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_overrides(config, overrides: Sequence[str]):
  """`section.field=value` overrides; values are Python literals (bare words are strings)."""
  for item in overrides:
    name, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not of the form section.field=value")
    *parents, field = name.split(".")
    node = config
    for p in parents:
      node = node[p]
    if field not in node:
      raise ValueError(f"unknown config field {name!r}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    old = node[field]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    node[field] = value
  return config


def image_hwc(config, channels: int | None) -> tuple[int, int, int]:
  """The pipeline's image shape: the resize target (or 144x256) and 1 channel (2: colour)."""
  data = config.data
  hw = tuple(data.image_size) if data.resize_image else (144, 256)
  if channels is None:
    franke = set(data.mice) & set("FGHIJKLMNO")
    channels = 2 if franke and not data.gray_scale else 1
  return hw + (channels,)


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs.


def flops_per_example(model_cfg, image_shape: Sequence[int], neuron_counts: Sequence[int],
                      batch_size: int) -> dict[str, float]:
  """Forward FLOPs of one example by part (2 per multiply-add; elementwise work not counted
  except the readout's bilinear sampling). "total" sums the parts; a train step is 3x that.

  Per block: qkv 2 T D 3HD, logits and attention-weighted values 2 H T^2 D each, output
  projection 2 T HD D, MLP 2 T D M twice. Readouts are computed over the padded N_max neurons.
  """
  from v1t_jax import model as v1t_model
  from v1t_jax import vit
  height, width, channels = image_shape
  if model_cfg.behavior_mode == 1:
    channels += v1t_model.NUM_BEHAVIOR
  if model_cfg.core == "stacked2d":
    return stacked2d_flops(model_cfg, (height, width, channels), neuron_counts, batch_size)
  rows, cols = vit.patch_grid((height, width), model_cfg.patch_size, model_cfg.patch_stride)
  return flops_by_part(
      patches=rows * cols, channels=channels, patch_size=model_cfg.patch_size,
      emb_dim=model_cfg.emb_dim, num_heads=model_cfg.num_heads, mlp_dim=model_cfg.mlp_dim,
      num_blocks=model_cfg.num_blocks, behavior_dim=model_cfg.behavior_dim,
      shifter=model_cfg.shift_mode == 2, n_max=max(neuron_counts),
      grid_predictor_dim=None if model_cfg.disable_grid_predictor else model_cfg.grid_predictor_dim,
      batch_size=batch_size)


def stacked2d_flops(model_cfg, image_shape: Sequence[int], neuron_counts: Sequence[int],
                    batch_size: int) -> dict[str, float]:
  """`flops_per_example` of the CNN core: 2 per multiply-add of every convolution (a
  depth-separable layer: 1x1, depthwise kxk, 1x1), plus the same readouts and shifter."""
  cfg = model_cfg.stacked2d
  height, width, channels = image_shape
  c = cfg.hidden_channels
  pad0 = cfg.input_kern // 2 if cfg.pad_input else 0
  h, w = height + 2 * pad0 - cfg.input_kern + 1, width + 2 * pad0 - cfg.input_kern + 1
  out = {"conv_0": 2.0 * h * w * channels * cfg.input_kern**2 * c}
  for layer, kern in enumerate(cfg.hidden_kerns, start=1):
    span = cfg.hidden_dilation * (kern - 1) + 1
    h, w = ((n + 2 * cfg.hidden_pad - span) // cfg.stride + 1 for n in (h, w))
    c_in = c * (min(cfg.skip, layer) if cfg.skip > 1 else 1)
    out[f"conv_{layer}"] = (2.0 * h * w * (c_in * c + c * kern**2 + c * c) if cfg.depth_separable
                            else 2.0 * h * w * c_in * c * kern**2)
  c_out = c * len(cfg.stacked_layers)
  n_max = max(neuron_counts)
  out["readout"] = 2.0 * 5 * n_max * c_out
  out["shifter"] = 2.0 * (2 * 5 + 5 * 5 + 5 * 2) if model_cfg.shift_mode == 2 else 0.0
  if not model_cfg.disable_grid_predictor:
    out["grid_predictor"] = 2.0 * n_max * (model_cfg.grid_predictor_dim * 30 + 30 * 2) / batch_size
  out["total"] = sum(out.values())
  return out


def flops_by_part(*, patches: int, channels: int, patch_size: int, emb_dim: int, num_heads: int,
                  mlp_dim: int, num_blocks: int, behavior_dim: int, shifter: bool, n_max: int,
                  grid_predictor_dim: int | None, batch_size: int) -> dict[str, float]:
  """`flops_per_example` from plain sizes (no JAX import: the PyTorch reference uses it too)."""
  tokens = patches + 1
  d, h, m, blocks = emb_dim, num_heads, mlp_dim, num_blocks
  inner = h * d
  out = {
      "patch_embedding": 2.0 * patches * channels * patch_size**2 * d,
      "qkv": blocks * 2.0 * tokens * d * 3 * inner,
      "attention_logits": blocks * 2.0 * h * tokens * tokens * d,
      "attention_values": blocks * 2.0 * h * tokens * tokens * d,
      "attention_projection": blocks * 2.0 * tokens * inner * d,
      "mlp": blocks * 2.0 * 2 * tokens * d * m,
      "behavior_mlp": (blocks * 2.0 * (behavior_dim * (d // 2) + (d // 2) * d)
                       if behavior_dim else 0.0),
      # 4 weighted corners + the per-neuron channel sum, C multiply-adds each.
      "readout": 2.0 * 5 * n_max * d,
      "shifter": 2.0 * (2 * 5 + 5 * 5 + 5 * 2) if shifter else 0.0,
  }
  if grid_predictor_dim is not None:  # once per mouse and batch: amortised per example
    out["grid_predictor"] = 2.0 * n_max * (grid_predictor_dim * 30 + 30 * 2) / batch_size
  out["total"] = sum(out.values())
  return out


# ---------------------------------------------------------------------------------------------
# Memory and allocator.


def reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark of this process (Linux >= 4.0); False if not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_gib() -> float:
  """Peak resident memory: VmHWM (resettable) where available, else ru_maxrss."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024 / GIB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,narenas:1"   # keep freed pages, one arena


def allocator_in_use() -> str:
  """'jemalloc' or 'tcmalloc' when preloaded (LD_PRELOAD), else 'glibc'."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    return "unknown"
  for name in ("jemalloc", "tcmalloc"):
    if f"lib{name}" in maps:
      return name
  return "glibc"


def _exec_with_jemalloc(argv: Sequence[str]):
  """Restarts this command with jemalloc preloaded (JEMALLOC_CONF: never purge freed pages)."""
  path = ctypes.util.find_library("jemalloc")
  candidates = [p for p in (path, "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                            "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2") if p]
  found = next((p for p in candidates if os.path.isabs(p) and os.path.exists(p)), None)
  if found is None and path:   # a bare soname: the dynamic loader finds it
    found = path
  if found is None:
    raise SystemExit("--malloc=jemalloc: libjemalloc not found (apt-get install libjemalloc2)")
  env = dict(os.environ, LD_PRELOAD=found, MALLOC_CONF=os.environ.get("MALLOC_CONF", JEMALLOC_CONF))
  os.execve(sys.executable, [sys.executable, "-m", "v1t_jax.bench", *argv], env)


def peak_device_gib(device) -> float | None:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / GIB


# ---------------------------------------------------------------------------------------------
# Model, state and batches.


def stand_in_mice(neuron_counts: Sequence[int], image_shape, n_train: int, seed: int):
  """MouseMeta tables with what the Trainer reads (neuron counts, coordinates, response stats)."""
  from v1t_jax import dataset_meta
  rng = np.random.default_rng(seed)
  mice = []
  for m, n in enumerate(neuron_counts):
    info = {"data_key": f"bench-{m}", "num_neurons": int(n), "image_shape": list(image_shape),
            "tiers": {"train": n_train, "validation": n_train // 9, "test": n_train // 9},
            "has_behavior": True, "has_pupil_center": True, "source_name": f"bench-{m}.zip"}
    arrays = {
        "neurons/cell_motor_coordinates": rng.uniform(-500, 500, (n, 3)).astype(np.float32),
        "neurons/unit_ids": np.arange(1, n + 1),
        "statistics/responses/all/mean": rng.gamma(2.0, 0.5, n).astype(np.float32),
        "statistics/responses/all/std": rng.gamma(2.0, 0.5, n).astype(np.float32) + 0.1,
    }
    mice.append(dataset_meta.MouseMeta(f"/nonexistent/bench-{m}", info, arrays))
  return mice


def synthetic_batch(neuron_counts, batch_size: int, image_shape, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  mice, n_max = len(neuron_counts), max(neuron_counts)
  return {
      "image": rng.normal(size=(mice, batch_size, *image_shape)).astype(np.float32),
      "behavior": np.abs(rng.normal(size=(mice, batch_size, 3))).astype(np.float32),
      "pupil_center": rng.normal(size=(mice, batch_size, 2)).astype(np.float32),
      "responses": rng.gamma(0.5, 1.0, size=(mice, batch_size, n_max)).astype(np.float32),
      "valid": np.ones((mice, batch_size), bool),
  }


# ---------------------------------------------------------------------------------------------
# Measurements.


def _cpu_times() -> tuple[float, float, int]:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime, r.ru_stime, r.ru_minflt


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _xla_memory_gib(compiled) -> dict:
  """XLA's buffer sizes for the compiled step (argument, output, temporaries), GiB."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return {}
  if m is None:
    return {}
  return {f"xla_{name}_gib": getattr(m, f"{name}_size_in_bytes") / GIB
          for name in ("argument", "output", "temp") if hasattr(m, f"{name}_size_in_bytes")}


def host_memory_gib() -> float:
  """Physical memory of this machine."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def check_fits_host(what: str, compiled, platform_name: str):
  """XLA:CPU allocates a step's temporaries in one block: refuse a step that cannot fit in host
  memory with a message instead of the runtime's RESOURCE_EXHAUSTED traceback."""
  need = sum(_xla_memory_gib(compiled).values())
  if platform_name == "cpu" and need > 0.9 * host_memory_gib():
    raise BenchError(f"{what} needs {need:.1f} GiB of XLA buffers, this machine has "
                     f"{host_memory_gib():.1f} GiB: lower --mice or --batch_size "
                     "(docs/benchmarks.md measures the default config with --mice=1 on CPU)")


class BenchError(Exception):
  """A measurement that cannot run here (printed as one line by main)."""


def measure(what: str, trainer, batch: dict, *, iters: int, warmup: int, seed: int,
            profile_dir: str | None = None) -> dict:
  """Compiles and times one of the Trainer's jitted steps; returns the raw figures. With
  `profile_dir`, one more call runs under jax.profiler.trace into `profile_dir/what`."""
  import jax
  import jax.numpy as jnp
  reset = reset_peak_rss()
  state = trainer.init_state(seed)
  dev_batch = trainer.device_batch(batch)
  if what == "train_step":
    key, lr_scale = jax.random.key(seed), jnp.float32(1.0)
    t0 = time.perf_counter()
    compiled = trainer.jitted_train_step.lower(state, dev_batch, key, lr_scale,
                                                trainer.lrs).compile()
    compile_s = time.perf_counter() - t0
    check_fits_host(what, compiled, jax.devices()[0].platform)

    def run(i):
      nonlocal state
      state, out = compiled(state, dev_batch, jax.random.fold_in(key, i), lr_scale, trainer.lrs)
      return out["loss"]
  elif what == "forward":
    params, buffers = state["params"], state["buffers"]
    t0 = time.perf_counter()
    compiled = trainer.eval_step.lower(params, buffers, dev_batch).compile()
    compile_s = time.perf_counter() - t0
    check_fits_host(what, compiled, jax.devices()[0].platform)

    def run(i):
      del i
      return compiled(params, buffers, dev_batch)["poisson"]
  else:
    raise ValueError(f"what must be train_step or forward, got {what!r}")
  peak_compile = peak_rss_gib()
  reset = reset_peak_rss() and reset   # the steps' own peak, without the compiler's
  def settle():
    # The runtime frees a step's temporaries just after its outputs are ready; give it a moment
    # so that the next step does not allocate its own next to them (a spurious 2x peak).
    time.sleep(0.2)

  for i in range(warmup):
    jax.block_until_ready(run(i))
    settle()
  times = []
  user0, sys0, faults0 = _cpu_times()
  for i in range(warmup, warmup + iters):
    t0 = time.perf_counter()
    jax.block_until_ready(run(i))
    times.append(time.perf_counter() - t0)
    settle()
  user1, sys1, faults1 = _cpu_times()
  if profile_dir:
    with jax.profiler.trace(os.path.join(profile_dir, what)):
      jax.block_until_ready(run(warmup + iters))
  return {"times": times, "compile_s": compile_s, "xla_flops": _xla_flops(compiled),
          "xla_memory": _xla_memory_gib(compiled),
          "peak_host_gib": peak_rss_gib(), "peak_rss_reset": reset,
          "peak_host_compile_gib": peak_compile,
          "user_s": (user1 - user0) / iters, "sys_s": (sys1 - sys0) / iters,
          "page_faults": (faults1 - faults0) / iters}


def parse_args(argv: Sequence[str] | None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/default.py", help="config file[:arg]")
  p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                 help="config override, e.g. model.compute_dtype=bfloat16 (repeatable)")
  p.add_argument("--batch_size", type=int, default=None, help="per mouse (default: the config's)")
  p.add_argument("--mice", type=int, default=None, help="mice per step (default: len(neurons))")
  p.add_argument("--neurons", default=",".join(map(str, SENSORIUM_PLUS_NEURONS)),
                 help="neuron counts per mouse, comma-separated (cycled to --mice)")
  p.add_argument("--channels", type=int, default=None, help="image channels (default: config)")
  # Train steps first, as in training (launch_train.py validates after its first epoch): with
  # glibc, the eval-sized heap that a forward-first order leaves is fragmented by the larger
  # train step (measured: peak RSS 10.5 GiB and ~250k page faults per default step, against
  # 5.6 GiB and none in this order).
  p.add_argument("--what", default="train_step,forward",
                 help="comma-separated, in order: train_step and/or forward")
  p.add_argument("--iters", type=int, default=5, help="timed calls (the median is reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after compilation")
  p.add_argument("--peak_gflops", type=float, default=None,
                 help="device peak GFLOP/s for MFU (e.g. 234: NumPy fp32 matmul on the 2-core VM)")
  p.add_argument("--n_train", type=int, default=N_TRAIN, help="train trials per mouse (ds_scale)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--profile_dir", default=None,
                 help="write a jax.profiler trace of one more call of each step here "
                      "(view with TensorBoard's profile plugin or Perfetto)")
  p.add_argument("--malloc", choices=("glibc", "jemalloc", "stock"), default="glibc",
                 help="glibc: keep freed memory (v1t_jax.allocator, as launch_train.py); "
                      "jemalloc: restart with jemalloc preloaded, never purging; stock: defaults")
  args, rest = p.parse_known_args(argv)
  for item in rest:   # --model.x=v / --train.x=v as shorthands for --set
    if item.startswith("--") and "." in item.split("=")[0] and "=" in item:
      args.set.append(item[2:])
    else:
      p.error(f"unrecognized argument {item!r}")
  return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.malloc == "jemalloc" and allocator_in_use() != "jemalloc":
    _exec_with_jemalloc(argv)
  malloc_tuned = allocator.keep_freed_memory() if args.malloc == "glibc" else False
  load_avg = os.getloadavg()

  import flax
  import jax

  from v1t_jax import model as v1t_model
  from v1t_jax import train

  config = apply_overrides(load_config(args.config), args.set)
  batch_size = args.batch_size or int(config.data.batch_size)
  counts = [int(n) for n in args.neurons.split(",")]
  mice = args.mice or len(counts)
  counts = [counts[i % len(counts)] for i in range(mice)]
  hwc = image_hwc(config, args.channels)
  stand_ins = stand_in_mice(counts, hwc, args.n_train, args.seed)
  trainer = train.Trainer(config, stand_ins, train.make_mesh(), hwc)
  model_cfg = v1t_model.model_config(config)
  flops = flops_per_example(model_cfg, hwc, counts, batch_size)
  batch = synthetic_batch(counts, batch_size, hwc, args.seed)
  device = jax.devices()[0]
  examples = mice * batch_size
  results = []
  for what in [w.strip() for w in args.what.split(",") if w.strip()]:
    raw = measure(what, trainer, batch, iters=args.iters, warmup=args.warmup, seed=args.seed,
                  profile_dir=args.profile_dir)
    step_s = float(np.median(raw["times"]))
    factor = 3.0 if what == "train_step" else 1.0   # backward = 2x forward
    gflop = factor * flops["total"] / 1e9
    gflops = gflop * examples / step_s
    result = {
        "what": what,
        "examples_per_s": examples / step_s,
        "step_s": step_s,
        "step_s_all": raw["times"],
        "gflop_per_example": gflop,
        "xla_gflop_per_example": (None if raw["xla_flops"] is None
                                  else raw["xla_flops"] / examples / 1e9),
        "gflops": gflops,
        "mfu": gflops / args.peak_gflops if args.peak_gflops else None,
        "peak_gflops": args.peak_gflops,
        "compile_s": raw["compile_s"],
        "peak_host_gib": raw["peak_host_gib"],
        "peak_host_since_start": not raw["peak_rss_reset"],
        "peak_host_compile_gib": raw["peak_host_compile_gib"],
        "peak_device_gib": peak_device_gib(device),
        **raw["xla_memory"],
        "user_s": raw["user_s"],
        "sys_s": raw["sys_s"],
        "page_faults": raw["page_faults"],
        "device": f"{device.platform}: {device.device_kind}",
        "devices": jax.device_count(),
        "config": args.config,
        "overrides": args.set,
        "mice": mice,
        "batch_size": batch_size,
        "examples_per_step": examples,
        "neurons": counts,
        "image_hwc": list(hwc),
        "compute_dtype": model_cfg.compute_dtype,
        "attention": model_cfg.attention,
        "remat": config.train.get("remat", "none"),
        "profile": os.path.join(args.profile_dir, what) if args.profile_dir else None,
        "malloc": args.malloc,
        "allocator": allocator_in_use(),
        "glibc_tuned": malloc_tuned,
        "iters": args.iters,
        "warmup": args.warmup,
        "load_avg_1m": load_avg[0],
        "jax": jax.__version__,
        "flax": flax.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    results.append(result)
    print(json.dumps(result), flush=True)
  return results


if __name__ == "__main__":
  try:
    main()
  except BenchError as e:
    sys.exit(f"error: {e}")
