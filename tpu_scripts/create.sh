#!/usr/bin/env bash
# Requests a TPU slice through a queued resource and waits until it is ACTIVE (capacity may take a while).
#   TPU_NAME=ouro ZONE=us-east5-a ACCELERATOR=v5p-8 [SPOT=1 | RESERVED=1] [SERVICE_ACCOUNT=...] tpu_scripts/create.sh
# WAIT_MINUTES (default 120; 0 = do not wait). STARTUP_SCRIPT=FILE: run FILE on every worker at each boot
# (see startup_script.sh). Delete with tpu_scripts/delete.sh; babysit.sh recreates a preempted one.
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
: "${WAIT_MINUTES:=120}"; : "${STARTUP_SCRIPT:=}"
options=()
if [ "$SPOT" = 1 ]; then options+=(--spot); fi
if [ "$RESERVED" = 1 ]; then options+=(--reserved); fi
if [ -n "$SERVICE_ACCOUNT" ]; then options+=(--service-account "$SERVICE_ACCOUNT" --scopes cloud-platform); fi
if [ -n "$STARTUP_SCRIPT" ]; then options+=(--metadata-from-file "startup-script=$STARTUP_SCRIPT"); fi
gcloud compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
  --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${options[@]}"
deadline=$((SECONDS + 60 * WAIT_MINUTES))
while [ "$WAIT_MINUTES" -gt 0 ]; do
  state=$(queued_state)
  echo "$(date +%T) queued resource $TPU_NAME: $state"
  case "$state" in
    ACTIVE) exit 0 ;;
    FAILED|SUSPENDED) echo "queued resource $TPU_NAME is $state; delete it with tpu_scripts/delete.sh" >&2; exit 1 ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then echo "still $state after $WAIT_MINUTES minutes" >&2; exit 1; fi
  sleep "${POLL_SECONDS:-30}"
done
