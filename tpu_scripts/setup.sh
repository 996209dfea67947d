#!/usr/bin/env bash
# Installs ouro_jax on every worker: the same code, Python >= 3.11 (uv) and jax[tpu]; with GCS_BUCKET set,
# also gcsfuse with the bucket mounted at MOUNT_DIR (a workdir every worker can write).
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
if [ -n "$REPO_URL" ]; then
  on_all_workers "rm -rf ~/$REPO_DIR && git clone -q $REPO_URL ~/$REPO_DIR"
else  # copy this checkout to every worker
  archive=$(mktemp --suffix=.tgz)
  tar czf "$archive" --exclude=.venv --exclude=runs --exclude=.git -C "$(dirname "$0")/.." .
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":/tmp/ouro_jax.tgz --zone "$ZONE" --project "$PROJECT" \
    --worker=all
  rm -f "$archive"
  on_all_workers "rm -rf ~/$REPO_DIR && mkdir -p ~/$REPO_DIR && tar xzf /tmp/ouro_jax.tgz -C ~/$REPO_DIR"
fi
on_all_workers "set -e; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
  export PATH=\$HOME/.local/bin:\$PATH; cd ~/$REPO_DIR; uv venv -q --python $PYTHON_VERSION .venv; \
  uv pip install -q --python .venv/bin/python -e '.[tpu]'; \
  .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
if [ -n "$GCS_BUCKET" ]; then
  on_all_workers "set -e; if ! command -v gcsfuse >/dev/null; then \
    echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
    sudo apt-get update -q && sudo apt-get install -yq gcsfuse; fi; \
    sudo mkdir -p $MOUNT_DIR && sudo chown \$USER $MOUNT_DIR; \
    mountpoint -q $MOUNT_DIR || gcsfuse --implicit-dirs $GCS_BUCKET $MOUNT_DIR"
fi
