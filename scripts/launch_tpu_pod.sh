#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice with one command.
#
#   scripts/launch_tpu_pod.sh NAME ZONE -- --config=configs/default.py \
#       --workdir=gs://BUCKET/runs/v1t --config.data.data_dir=gs://BUCKET/sensorium_tfds
#
# Creates the TPU VM if it does not exist (TPU_TYPE, TPU_VERSION below), copies this checkout to
# every worker, installs it with `.[tpu]` into a venv there, and runs launch_train.py with the
# given arguments on all workers at once (`--worker=all`). Each worker is one JAX process;
# launch_train.py detects the pod (TPU_WORKER_HOSTNAMES) and calls jax.distributed.initialize(),
# so the arguments are the same as on one machine. Put data and workdir on gs:// (tfds and orbax
# read and write GCS), or let each worker synthesize its own copy of the synthetic demo.
# Not run by us (no TPU access from our machines); every command is plain gcloud.
set -euo pipefail

if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 NAME ZONE -- LAUNCH_TRAIN_ARGS..." >&2
  exit 2
fi
NAME=$1
ZONE=$2
shift 3
TPU_TYPE=${TPU_TYPE:-v4-32}
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-v1t_jax}

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" > /dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" \
      --accelerator-type "$TPU_TYPE" --version "$TPU_VERSION"
fi

cd "$(dirname "$0")/.."
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git ls-files -z | tar --null -czf "$archive" -T -    # tracked files only: no venv, data or runs
gcloud compute tpus tpu-vm scp "$archive" "$NAME:~/v1t_jax.tar.gz" --zone "$ZONE" --worker=all

args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e
  mkdir -p ~/$REMOTE_DIR && tar -xzf ~/v1t_jax.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR
  [ -d .venv ] || python3 -m venv .venv
  .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/python launch_train.py$args"
