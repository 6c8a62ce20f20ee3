#!/usr/bin/env bash
# Installs v1t_jax and runs the main job end to end on the synthetic default: synthesize the
# `demo` preset, convert it to TFRecord shards, and summarise the input pipeline.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/install.sh"
python launch_train.py --config=configs/synthetic.py --workdir=runs/demo "$@"
