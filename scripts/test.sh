#!/usr/bin/env bash
# Installs v1t_jax and runs the test suite (CPU only, tiny synthetic data written by the tests).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/install.sh"
# Two workers (pytest-xdist) on 2 cores: much of a test is Python, TensorFlow start-up and
# subprocesses, which overlap. loadfile: a module-scoped fixture is built once; modules go out
# in conftest's order (slowest first), not xdist's default (most tests first).
python -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder "$@"
