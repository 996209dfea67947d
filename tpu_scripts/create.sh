#!/usr/bin/env bash
# Creates a TPU VM slice: TPU_NAME=ouro ZONE=us-east5-a ACCELERATOR=v5p-32 tpu_scripts/create.sh
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
  --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
