#!/usr/bin/env bash
# Stops a run for good: marks WORKDIR/logs/STOP (worker_loop.sh then does not rerun) and sends SIGTERM to
# the training processes; they agree on a step, save it and exit. Resume later with train.sh.
#   tpu_scripts/stop.sh WORKDIR
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
WORKDIR=${1:?workdir of the run}
on_all_workers "mkdir -p $WORKDIR/logs && touch $WORKDIR/logs/STOP && (pkill -TERM -f '^.venv/bin/python -m ouro_jax.cli.train' || true)"
