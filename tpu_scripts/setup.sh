#!/usr/bin/env bash
# Installs ouro_jax on every worker of the slice (same code and packages on every host).
source "$(dirname "$0")/common.sh"
if [ -n "$REPO_URL" ]; then
  on_all_workers "rm -rf $REPO_DIR && git clone -q $REPO_URL $REPO_DIR"
else  # copy this checkout to every worker
  tar czf /tmp/ouro_jax.tgz --exclude=.venv --exclude=runs --exclude=.git -C "$(dirname "$0")/.." .
  gcloud compute tpus tpu-vm scp /tmp/ouro_jax.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --project "$PROJECT" --worker=all
  on_all_workers "rm -rf $REPO_DIR && mkdir -p $REPO_DIR && tar xzf /tmp/ouro_jax.tgz -C $REPO_DIR"
fi
on_all_workers "cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
