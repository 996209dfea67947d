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
: "${RESERVED:=0}"                   # 1: the project's reserved capacity (--reserved)
: "${SERVICE_ACCOUNT:=}"             # the VMs' service account ('' = the default compute one); needs the bucket
: "${REPO_URL:=}"                    # where the workers clone ouro_jax from ('' = copy this checkout)
: "${REPO_DIR:=ouro_jax}"            # on each worker, relative to the home directory
: "${PYTHON_VERSION:=3.11}"
: "${GCS_BUCKET:=}"                  # optional: mounted with gcsfuse at MOUNT_DIR on every worker
: "${MOUNT_DIR:=/mnt/ouro}"
# How a worker installs the checkout's dependencies into ~/$REPO_DIR/.venv (run there).
: "${INSTALL_CMD:=command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
export PATH=\$HOME/.local/bin:\$PATH; uv venv -q --python $PYTHON_VERSION .venv; \
uv pip install -q --python .venv/bin/python -e '.[tpu]'}"
# This machine's record of the slice (the run's command, the supervisor's log, the STOP mark).
: "${STATE_DIR:=$HOME/.ouro_tpu/$TPU_NAME}"
export TPU_NAME ZONE PROJECT ACCELERATOR RUNTIME SPOT RESERVED SERVICE_ACCOUNT REPO_URL REPO_DIR PYTHON_VERSION \
  GCS_BUCKET MOUNT_DIR INSTALL_CMD STATE_DIR

# Runs a shell command on every worker of the slice (in parallel).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$1"
}

# Number of workers (hosts) of the slice.
num_workers() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --format='value(networkEndpoints[].ipAddress)' | tr ';' '\n' | grep -c .
}

# The queued resource's state (ACTIVE, SUSPENDED, ...), or NOT_FOUND.
queued_state() {
  gcloud compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --format='value(state.state)' 2>/dev/null || echo NOT_FOUND
}

# A run's log directory on each worker, from its workdir (local disk: a gs:// workdir has no local path):
# ~/ouro_logs/<workdir with every character but [A-Za-z0-9._-] made '_'>.
run_logs() {
  echo "ouro_logs/$(printf %s "${1:?workdir}" | tr -c 'A-Za-z0-9._-' _)"
}

# The shell snippet that sets WORKER to this worker's index (TPU metadata; the hostname if unavailable).
# shellcheck disable=SC2016,SC2034  # expanded on the worker, used by the scripts that source this one
WORKER_INDEX='WORKER=${TPU_WORKER_ID:-$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)}'

# The worker-side shell that installs the checkout in ~/$REPO_DIR and, with GCS_BUCKET set, mounts it at
# MOUNT_DIR with gcsfuse (--rename-dir-limit: orbax publishes a checkpoint by renaming its directory).
setup_commands() {
  local mount=""
  if [ -n "$GCS_BUCKET" ]; then
    mount="if ! command -v gcsfuse >/dev/null; then \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
sudo apt-get update -q && sudo apt-get install -yq gcsfuse; fi; \
sudo mkdir -p $MOUNT_DIR && sudo chown \$USER $MOUNT_DIR; \
mountpoint -q $MOUNT_DIR || gcsfuse --implicit-dirs --rename-dir-limit=1000000 --file-mode=644 --dir-mode=755 \
$GCS_BUCKET $MOUNT_DIR; "
  fi
  echo "set -e; cd ~/$REPO_DIR; $INSTALL_CMD; $mount\
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
}
