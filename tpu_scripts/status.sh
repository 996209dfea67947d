#!/usr/bin/env bash
# Per worker: the training processes (or none) and the last LINES (default 5) lines of its log.
#   tpu_scripts/status.sh WORKDIR
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
WORKDIR=${1:?workdir of the run}; : "${LINES:=5}"
logs=$(run_logs "$WORKDIR")
echo "queued resource $TPU_NAME: $(queued_state)"
on_all_workers "$WORKER_INDEX; echo \"== worker \$WORKER (\$(hostname))\"; \
  pgrep -af '[o]uro_jax.cli.train .*--workdir $WORKDIR ' || echo 'no training process'; \
  tail -n $LINES ~/$logs/worker-\$WORKER.log 2>/dev/null || echo 'no log yet'"
