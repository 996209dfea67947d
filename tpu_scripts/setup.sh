#!/usr/bin/env bash
# Installs ouro_jax on every worker: the same code, Python >= 3.11 (uv) and jax[tpu] (INSTALL_CMD); with
# GCS_BUCKET set, also gcsfuse with the bucket mounted at MOUNT_DIR (a workdir every worker can write).
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
if [ -n "$REPO_URL" ]; then
  on_all_workers "rm -rf ~/$REPO_DIR && git clone -q $REPO_URL ~/$REPO_DIR"
else  # copy this checkout to every worker
  archive=$(mktemp --suffix=.tgz)
  tar czf "$archive" --exclude=.venv --exclude=runs --exclude=.git -C "$(dirname "$0")/.." .
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":ouro_jax.tgz --zone "$ZONE" --project "$PROJECT" \
    --worker=all
  rm -f "$archive"
  on_all_workers "rm -rf ~/$REPO_DIR && mkdir -p ~/$REPO_DIR && tar xzf ~/ouro_jax.tgz -C ~/$REPO_DIR && rm ~/ouro_jax.tgz"
fi
on_all_workers "$(setup_commands)"
