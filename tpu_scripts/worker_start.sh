#!/usr/bin/env bash
# Runs on a worker (from train.sh over ssh, or from the queued resource's startup script): starts the
# training command under worker_loop.sh in the background, logging to ~/LOGS/worker-N.log.
#   tpu_scripts/worker_start.sh LOGS CONFIG WORKDIR [--config.key=value ...]
# LOGS: the run's log directory relative to the home directory (common.sh run_logs); a STOP file there
# (stop.sh) keeps worker_loop.sh from rerunning the command. DISTRIBUTED=False (worker environment) runs a
# single-host slice without jax.distributed.
set -euo pipefail
LOGS=${1:?log directory}; CONFIG=${2:?config file}; WORKDIR=${3:?workdir}; shift 3
cd "$(dirname "$0")/.."
WORKER=${TPU_WORKER_ID:-$(curl -sf -m 5 -H Metadata-Flavor:Google \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)}
mkdir -p "$HOME/$LOGS"
rm -f "$HOME/$LOGS/STOP"
nohup tpu_scripts/worker_loop.sh "$HOME/$LOGS/worker-$WORKER.log" "$HOME/$LOGS/STOP" \
  .venv/bin/python -m ouro_jax.cli.train --config "$CONFIG" --workdir "$WORKDIR" \
  "--config.distributed=${DISTRIBUTED:-True}" "$@" \
  >/dev/null 2>&1 </dev/null &
echo "worker $WORKER: started (log ~/$LOGS/worker-$WORKER.log)"
