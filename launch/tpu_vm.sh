#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command runs on every worker of the slice
# through `gcloud compute tpus tpu-vm ssh --worker=all`, and JAX finds the other workers
# by itself (--distributed=auto: the TPU runtime knows the slice).
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]
#
#   launch/tpu_vm.sh my-v5p-32 us-east5-a experiments/demo.py /mnt/runs/demo \
#       --config.mesh.ici_fsdp=16
#
# Each worker runs, in its checkout $REPO_DIR:
#   $PYTHON -m sora_jax.train --config=CONFIG --workdir=WORKDIR --distributed=auto FLAGS...
# Before: copy the same checkout to every worker and install it there, e.g.
#   gcloud compute tpus tpu-vm ssh my-v5p-32 --zone=us-east5-a --worker=all \
#       --command="git clone REPO sora_jax && cd sora_jax && pip install -e . 'jax[tpu]'"
# WORKDIR must be the same shared directory on every worker (a Filestore or GCS FUSE mount):
# check it with `python -m sora_jax.env --check_cluster --distributed=auto --workdir=WORKDIR`
# run the same way. The ssh sessions stream every worker's output here; stopping this script
# does not stop the remote processes (docs/launching.md says how).
#
# Environment: REPO_DIR (checkout on the workers, relative to the remote home or absolute;
# default sora_jax), PYTHON (default python3), PROJECT (gcloud --project).
set -euo pipefail

if (($# < 4)); then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]" >&2
  exit 2
fi
name=$1
zone=$2
config=$3
workdir=$4
shift 4
# The remote command is one string for the workers' shell: quote every word once.
train=("${PYTHON:-python3}" -m sora_jax.train --config="$config" --workdir="$workdir"
  --distributed=auto "$@")
printf -v remote 'cd %q && exec' "${REPO_DIR:-sora_jax}"
printf -v quoted ' %q' "${train[@]}"
remote+=$quoted
args=(compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote")
if [[ -n ${PROJECT:-} ]]; then
  args+=(--project="$PROJECT")
fi
exec gcloud "${args[@]}"
