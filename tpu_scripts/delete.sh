#!/usr/bin/env bash
# Deletes the slice and its queued resource (the workdir on a bucket survives).
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
gcloud compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --force --quiet
