#!/usr/bin/env bash
# Multi-host training on a Cloud TPU VM slice: the same entry point on every worker.
#   launch/tpu_vm.sh TPU_NAME ZONE configs/lens_3p8b.py gs://bucket/runs/lens [--config.FIELD=VALUE ...]
# Assumes the repository is checked out at ~/lens_jax on every worker with `make venv` already run.
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
EXTRA=$(printf ' %q' "$@")
# On TPU VMs jax.distributed.initialize() discovers the slice by itself.
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/lens_jax && LENS_DISTRIBUTED=1 .venv/bin/python -m lens_jax.train --config $CONFIG --workdir $WORKDIR$EXTRA"
