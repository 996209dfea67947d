#!/usr/bin/env bash
# Shared settings of the TPU scripts; override any of them in the environment.
# Usage: source tpu_scripts/common.sh (done by the other scripts).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM (and queued resource) name}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ACCELERATOR:=v5p-8}"            # e.g. v5p-8, v5p-128, v6e-8
: "${RUNTIME:=v2-alpha-tpuv5}"       # v2-alpha-tpuv6e for v6e
: "${SPOT:=0}"                       # 1: spot capacity (cheaper, preemptible)
: "${REPO_URL:=}"                    # where the workers clone ouro_jax from ('' = copy this checkout)
: "${REPO_DIR:=ouro_jax}"            # on each worker, relative to the home directory
: "${PYTHON_VERSION:=3.11}"
: "${GCS_BUCKET:=}"                  # optional: mounted with gcsfuse at MOUNT_DIR on every worker
: "${MOUNT_DIR:=/mnt/ouro}"
export TPU_NAME ZONE PROJECT ACCELERATOR RUNTIME SPOT REPO_URL REPO_DIR PYTHON_VERSION GCS_BUCKET MOUNT_DIR

# Runs a shell command on every worker of the slice (in parallel).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$1"
}

# Number of workers (hosts) of the slice.
num_workers() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --format='value(networkEndpoints[].ipAddress)' | tr ';' '\n' | grep -c .
}

# The shell snippet that sets WORKER to this worker's index (TPU metadata; the hostname if unavailable).
# shellcheck disable=SC2016,SC2034  # expanded on the worker, used by the scripts that source this one
WORKER_INDEX='WORKER=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
