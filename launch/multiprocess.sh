#!/usr/bin/env bash
# Runs one command as N cooperating JAX processes on this machine, each with its own CPU
# devices, joined by jax.distributed with gloo collectives: a multi-host run rehearsed (and
# tested) on one machine.
#
#   launch/multiprocess.sh N [DEVICES_PER_PROCESS] [--] COMMAND...
#
#   launch/multiprocess.sh 2 4 python -m sora_jax.train \
#       --config=experiments/demo.py:tiny --workdir=runs/mp
#   launch/multiprocess.sh 2 -- python -m sora_jax.env --check_cluster --workdir=runs/mp
#
# Process i runs `COMMAND --coordinator_address=localhost:$PORT --num_processes=N
# --process_id=i` with JAX_PLATFORMS=cpu and DEVICES_PER_PROCESS (default 1) CPU devices
# (--xla_force_host_platform_device_count appended to XLA_FLAGS). Its output goes to
# $LOG_DIR/host_<i>.log; process 0's is shown here too. LOG_DIR defaults to WORKDIR/logs
# when COMMAND has --workdir=WORKDIR, else ./logs. When one process fails the others are
# stopped and the script exits with the first non-zero status; Ctrl-C stops them all.
#
# Environment: PORT (coordinator port, default 12355; give concurrent runs different
# ports), LOG_DIR.
set -euo pipefail

usage="usage: $0 N [DEVICES_PER_PROCESS] [--] COMMAND..."
positive='^[1-9][0-9]*$'
if (($# < 2)) || [[ ! $1 =~ $positive ]]; then
  echo "$usage" >&2
  exit 2
fi
num=$1
shift
devices=1
if [[ $1 =~ $positive ]]; then
  devices=$1
  shift
fi
if [[ ${1:-} == -- ]]; then
  shift
fi
if (($# == 0)); then
  echo "error: no COMMAND to run; $usage" >&2
  exit 2
fi

log_dir=${LOG_DIR:-}
previous=
for arg in "$@"; do
  case $arg in
    --coordinator_address* | --num_processes* | --process_id*)
      echo "error: COMMAND sets ${arg%%=*}, which $0 sets for each process; remove it" >&2
      exit 2
      ;;
    --workdir=*) [[ -n ${LOG_DIR:-} ]] || log_dir="${arg#--workdir=}/logs" ;;
  esac
  if [[ $previous == --workdir && -z ${LOG_DIR:-} ]]; then
    log_dir="$arg/logs"
  fi
  previous=$arg
done
log_dir=${log_dir:-logs}
mkdir -p "$log_dir"
port=${PORT:-12355}

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
# Ctrl-C or a TERM from a scheduler: stop every process, never leave one waiting for peers.
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
for ((i = 0; i < num; i++)); do
  log="$log_dir/host_$i.log"
  wiring=(--coordinator_address="localhost:$port" --num_processes="$num" --process_id="$i")
  if ((i == 0)); then
    "$@" "${wiring[@]}" > >(tee "$log") 2>&1 &
  else
    "$@" "${wiring[@]}" >"$log" 2>&1 &
  fi
  pids+=("$!")
done
echo "multiprocess.sh: started $num processes x $devices CPU devices (pids ${pids[*]}), coordinator localhost:$port, logs $log_dir/host_<i>.log" >&2

status=0
running=("${pids[@]}")
# Poll rather than `wait -n`: a child that already exited is still reaped by `wait PID`
# (bash keeps its status), whereas `wait -n` can miss one that ended in between.
while ((${#running[@]} > 0)); do
  left=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      left+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
      failed=?
      for i in "${!pids[@]}"; do
        [[ ${pids[$i]} == "$pid" ]] && failed=$i
      done
      echo "multiprocess.sh: process $failed (pid $pid) exited with $rc; stopping the others (log: $log_dir/host_$failed.log)" >&2
      stop_all
    fi
  done
  running=("${left[@]+"${left[@]}"}")
  ((${#running[@]} > 0)) && sleep 0.2
done
exit "$status"
