#!/usr/bin/env bash
# Installs v1t_jax and runs the main job end to end on the synthetic default: synthesize the
# `demo` preset and convert it to TFRecord shards (first run only), train configs/synthetic.py,
# evaluate the best checkpoint and print the test metrics next to the oracle ceiling.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/install.sh"
python launch_train.py --config=configs/synthetic.py --workdir=runs/demo "$@"
