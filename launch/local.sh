#!/usr/bin/env bash
# Tries the multi-host path on one machine, on its CPU: N processes of one JAX job, joined on
# 127.0.0.1, each with DEVICES_PER_PROCESS fake CPU devices (default 1). It is how the tests run
# multi-host; it is not a way to use GPUs (one process already drives every GPU of a node: run
# patchdiff.main directly; several nodes: launch/slurm.sbatch, launch/tpu_vm.sh).
#   launch/local.sh N CONFIG WORKDIR [more flags for patchdiff.main ...]
# PORT picks the coordinator port (default 12355). Logs go to WORKDIR/process_I.log.
# The interpreter is $PYTHON, else the repository's .venv/bin/python if it exists, else python3.
set -euo pipefail
n=${1:?number of processes}; config=${2:?config file}; workdir=${3:?workdir}; shift 3
port=${PORT:-12355}
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$workdir"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"
pids=()
for ((i = 0; i < n; i++)); do
  "$PYTHON" -m patchdiff.main --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@" \
    >"$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
