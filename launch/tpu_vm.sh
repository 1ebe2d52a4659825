#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU VM slice; JAX finds the other workers
# itself (jax.distributed.initialize on TPU VMs). The repo must be at the same path on all
# workers and WORKDIR on storage they all see (e.g. a gs:// bucket).
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_vm.sh configs/imagenet256.py gs://bucket/run [flags ...]
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
repo=${REPO_DIR:-patchdiff}
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd $repo && python -m patchdiff.main --config=$config --workdir=$workdir --distributed=on $*"
