"""Test setup: CPU only, 4 fake devices, quiet TensorFlow. Runs before any test imports jax."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# Identical programs (the same tiny model in several tests) compile once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/v1t_jax_test_compile_cache")
# Every program: even ones compiling in under 0.5 s recur across processes (docs/benchmarks.md).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tiny programs: XLA's optimisation passes cost more time than they save.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402

# The slowest modules, longest first, so that pytest-xdist's workers finish together
# (scripts/test.sh: 2 workers, a module per worker at a time, in this order). The model-level
# modules go second and third: the ensemble and sweep tests then start after test_train.py has
# put the tiny model's programs into the persistent compilation cache.
SLOW_FIRST = ("test_train.py", "test_torch_reference.py", "test_vit.py", "test_ensemble.py",
              "test_sweep.py", "test_multiprocess.py", "test_launch.py", "test_interruptions.py",
              "test_insilico.py", "test_run_guards.py", "test_bench.py", "test_figures.py",
              "test_import_torch.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
  items.sort(key=rank)   # stable: the order within a module is kept


def shared(tmp_path_factory, name: str, make):
  """`make(folder)` once per test session, for every pytest-xdist worker: the first worker to
  ask builds it under a file lock in the session's shared temporary folder, the others wait for
  it and reuse it. Returns (folder, what make returned, JSON-encodable)."""
  import json

  import filelock
  if "PYTEST_XDIST_WORKER" not in os.environ:   # one process: an ordinary session fixture
    folder = tmp_path_factory.mktemp(name)
    return folder, make(str(folder))
  root = tmp_path_factory.getbasetemp().parent   # pytest-N/, above each worker's popen-gwK/
  folder, done = root / name, root / f"{name}.json"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      folder.mkdir(exist_ok=True)   # a failed attempt's leftovers are rewritten
      done.write_text(json.dumps(make(str(folder))))
  return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def tiny_zips(tmp_path_factory):
  """The `tiny` preset with competition mice (mouse 0 stimulus-only, mouse 1 Sensorium+)."""
  from data_prep import synthesize
  return shared(tmp_path_factory, "tiny_zips", lambda out: [str(z) for z in synthesize.synthesize(
      out, "tiny", seed=0, competition=True)])[1]


@pytest.fixture(scope="session")
def tiny_data_dir(tiny_zips, tmp_path_factory):
  """tiny_zips converted with data_prep.convert."""
  from data_prep import convert

  def make(out):
    convert.convert(tiny_zips, out)
  return str(shared(tmp_path_factory, "tiny_tfds", make)[0])


@pytest.fixture(scope="session")
def one_epoch_run(tiny_zips, tiny_data_dir, tmp_path_factory):
  """A finished 1-epoch run of the tiny config, shared: a checkpoint every step (latest: steps 2
  and 3), the lr decaying linearly over the epoch, a progress line at every step, figures of the
  best state in TensorBoard, the oracle from the zips' ground truth. Returns (workdir, config,
  what it printed, what train_and_evaluate returned). Copy the workdir before changing it."""
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.data_dir = tiny_data_dir
  config.train.update(num_epochs=1, checkpoint_every_steps=1, figures_every_epochs=1,
                      lr_decay_epochs=1)
  config.train.progress_every_s = 0.0
  config.synthetic.zip_dir = os.path.dirname(tiny_zips[0])

  def make(folder):
    import contextlib
    import io

    from v1t_jax import figures, train
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      result = train.train_and_evaluate(config, os.path.join(folder, "run"),
                                        figures=figures.write_summary)
    return out.getvalue(), result
  folder, (printed, result) = shared(tmp_path_factory, "one_epoch_run", make)
  return str(folder / "run"), config, printed, result


@pytest.fixture
def one_epoch_copy(one_epoch_run, tmp_path):
  """A copy of one_epoch_run's workdir to damage or resume."""
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(one_epoch_run[0], workdir, ignore=shutil.ignore_patterns(".lock"))
  return workdir
