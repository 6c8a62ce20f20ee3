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
