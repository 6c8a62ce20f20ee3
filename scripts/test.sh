#!/usr/bin/env bash
# Installs v1t_jax and runs the test suite (CPU only, tiny synthetic data written by the tests).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/install.sh"
python -m pytest tests "$@"
