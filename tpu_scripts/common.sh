# Shared settings of the TPU scripts; override any of them in the environment.
# Usage: source tpu_scripts/common.sh (done by the other scripts).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ACCELERATOR:=v5p-8}"            # e.g. v5p-8, v5p-128, v6e-8
: "${RUNTIME:=v2-alpha-tpuv5}"       # v2-alpha-tpuv6e for v6e
: "${REPO_URL:=}"                    # where the workers clone ouro_jax from (or rsync it, see setup.sh)
: "${REPO_DIR:=ouro_jax}"

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$1"
}
