#!/usr/bin/env bash
# Train on this machine as one process, on all of its devices (CPU, the GPUs of one host,
# or a single-host TPU VM).
#
#   launch/local.sh CONFIG WORKDIR [FLAGS...]
#
#   launch/local.sh experiments/demo.py:tiny runs/tiny
#   launch/local.sh experiments/demo.py:tiny runs/tiny --config.optimizer.lr=3e-4
#
# Runs `$PYTHON -m sora_jax.train --config=CONFIG --workdir=WORKDIR FLAGS...` (PYTHON
# defaults to python3: activate the virtualenv first). Re-running the same command resumes
# from the latest checkpoint in WORKDIR. Every other launcher in launch/ runs this same
# command, adding only how the processes find each other (docs/launching.md).
set -euo pipefail

if (($# < 2)); then
  echo "usage: $0 CONFIG WORKDIR [FLAGS...]   e.g. $0 experiments/demo.py:tiny runs/tiny" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
exec "${PYTHON:-python3}" -m sora_jax.train --config="$config" --workdir="$workdir" "$@"
