#!/usr/bin/env bash
# Runs one command as P cooperating JAX processes on this machine, D CPU devices each, joined
# through jax.distributed with gloo collectives: how multi-host runs are tested locally.
#
#   launch/local_multiprocess.sh P D python -m sora_jax.train --config=... --workdir=W
#
# Each process gets --coordinator_address/--num_processes/--process_id and writes its output
# to ${LOG_DIR:-W/logs or .}/host_<i>.log. If one process fails the others are stopped, and
# the script exits with the first non-zero status. PORT (default 12355) picks the port.
set -u
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
P=$1; D=$2; shift 2
PORT=${PORT:-12355}
if [ -z "${LOG_DIR:-}" ]; then
  LOG_DIR=.
  for arg in "$@"; do
    case $arg in --workdir=*) LOG_DIR="${arg#--workdir=}/logs" ;; esac
  done
fi
mkdir -p "$LOG_DIR"

pids=()
for ((i = 0; i < P; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$D" \
    "$@" --coordinator_address="localhost:$PORT" --num_processes="$P" --process_id="$i" \
    >"$LOG_DIR/host_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $P processes (${pids[*]}); logs in $LOG_DIR/host_<i>.log"

status=0
running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
  wait -n -p done_pid "${running[@]}"
  rc=$?
  running=("${running[@]/$done_pid/}")
  running=(${running[@]})  # drop the emptied entry
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "process $done_pid exited with $rc: stopping the others" >&2
    kill "${running[@]}" 2>/dev/null
  fi
done
exit $status
