#!/usr/bin/env bash
# Copies every worker's log (~/ouro_logs/<run>/worker-N.log on the worker) into OUT (default logs/TPU_NAME).
#   tpu_scripts/logs.sh WORKDIR [OUT]
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
WORKDIR=${1:?workdir of the run}; OUT=${2:-logs/$TPU_NAME}
logs=$(run_logs "$WORKDIR")
mkdir -p "$OUT"
for ((w = 0; w < $(num_workers); w++)); do
  gcloud compute tpus tpu-vm scp "$TPU_NAME:$logs/worker-$w.log" "$OUT/" --zone "$ZONE" --project "$PROJECT" \
    --worker="$w" || echo "worker $w: no log" >&2
done
ls -l "$OUT"
