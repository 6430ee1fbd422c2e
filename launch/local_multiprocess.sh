#!/usr/bin/env bash
# N CPU processes on this machine, coordinated through jax.distributed on 127.0.0.1 (a multi-host rehearsal).
#   launch/local_multiprocess.sh 2 configs/tiny.py runs/mp [--config.FIELD=VALUE ...]
set -euo pipefail
N=${1:?number of processes}; CONFIG=${2:?config}; WORKDIR=${3:?workdir}; shift 3
PY=${PYTHON:-.venv/bin/python}
PORT=${LENS_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  LENS_COORDINATOR=127.0.0.1:$PORT LENS_NUM_PROCESSES=$N LENS_PROCESS_ID=$i \
    "$PY" -m lens_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
