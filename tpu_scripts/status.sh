#!/usr/bin/env bash
# Per worker: the training processes (or none) and the last LINES (default 5) lines of its log.
#   tpu_scripts/status.sh WORKDIR
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
WORKDIR=${1:?workdir of the run}; : "${LINES:=5}"
on_all_workers "$WORKER_INDEX; echo \"== worker \$WORKER (\$(hostname))\"; \
  pgrep -af 'ouro_jax.cli.train' | grep -v pgrep || echo 'no training process'; \
  tail -n $LINES $WORKDIR/logs/worker-\$WORKER.log 2>/dev/null || echo 'no log yet'"
