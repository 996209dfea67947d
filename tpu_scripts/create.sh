#!/usr/bin/env bash
# Requests a TPU slice through a queued resource and waits until it is ACTIVE (capacity may take a while).
#   TPU_NAME=ouro ZONE=us-east5-a ACCELERATOR=v5p-8 [SPOT=1] tpu_scripts/create.sh
# WAIT_MINUTES (default 120; 0 = do not wait). Delete with tpu_scripts/delete.sh.
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
: "${WAIT_MINUTES:=120}"
capacity=()
if [ "$SPOT" = 1 ]; then capacity=(--spot); fi
gcloud compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
  --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${capacity[@]}"
deadline=$((SECONDS + 60 * WAIT_MINUTES))
while [ "$WAIT_MINUTES" -gt 0 ]; do
  state=$(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --format='value(state.state)')
  echo "$(date +%T) queued resource $TPU_NAME: $state"
  case "$state" in
    ACTIVE) exit 0 ;;
    FAILED|SUSPENDED) echo "queued resource $TPU_NAME is $state; delete it with tpu_scripts/delete.sh" >&2; exit 1 ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then echo "still $state after $WAIT_MINUTES minutes" >&2; exit 1; fi
  sleep 30
done
