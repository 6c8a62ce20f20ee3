"""Test setup: CPU only, 4 fake devices, quiet TensorFlow. Runs before any test imports jax."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# Identical programs (the same tiny model in several tests) compile once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/v1t_jax_test_compile_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tiny programs: XLA's optimisation passes cost more time than they save.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402

# The slowest modules, longest first, so that pytest-xdist's workers finish together
# (scripts/test.sh: 2 workers, a module per worker at a time, in this order).
SLOW_FIRST = ("test_train.py", "test_sweep.py", "test_ensemble.py", "test_multiprocess.py",
              "test_launch.py", "test_torch_reference.py", "test_vit.py", "test_insilico.py",
              "test_interruptions.py", "test_figures.py", "test_import_torch.py",
              "test_run_guards.py", "test_bench.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
  items.sort(key=rank)   # stable: the order within a module is kept


@pytest.fixture(scope="session")
def tiny_zips(tmp_path_factory):
  """The `tiny` preset with competition mice (mouse 0 stimulus-only, mouse 1 Sensorium+)."""
  from data_prep import synthesize
  out = tmp_path_factory.mktemp("tiny_zips")
  return synthesize.synthesize(str(out), "tiny", seed=0, competition=True)


@pytest.fixture(scope="session")
def tiny_data_dir(tiny_zips, tmp_path_factory):
  """tiny_zips converted with data_prep.convert."""
  from data_prep import convert
  out = tmp_path_factory.mktemp("tiny_tfds")
  convert.convert(tiny_zips, str(out))
  return str(out)


@pytest.fixture(scope="session")
def one_epoch_run(tiny_zips, tiny_data_dir, tmp_path_factory):
  """A finished 1-epoch run of the tiny config, shared: a checkpoint every step (latest: steps 2
  and 3), a progress line at every step, figures of the best state in TensorBoard, the oracle
  from the zips' ground truth. Returns (workdir, config, what it printed). Copy the workdir
  before changing it."""
  import contextlib
  import io

  from configs import synthetic
  from v1t_jax import figures, train
  config = synthetic.get_config("tiny")
  config.data.data_dir = tiny_data_dir
  config.train.update(num_epochs=1, checkpoint_every_steps=1, figures_every_epochs=1)
  config.train.progress_every_s = 0.0
  config.synthetic.zip_dir = os.path.dirname(tiny_zips[0])
  workdir = str(tmp_path_factory.mktemp("one_epoch_run") / "run")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.train_and_evaluate(config, workdir, figures=figures.write_summary)
  return workdir, config, out.getvalue()


@pytest.fixture
def one_epoch_copy(one_epoch_run, tmp_path):
  """A copy of one_epoch_run's workdir to damage or resume."""
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(one_epoch_run[0], workdir, ignore=shutil.ignore_patterns(".lock"))
  return workdir
