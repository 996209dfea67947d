#!/usr/bin/env bash
# Stops a run for good: marks STOP in the run's log directory on every worker (worker_loop.sh then does
# not rerun) and in STATE_DIR (babysit.sh then stops supervising), and sends SIGTERM to the training
# processes; they agree on a step, save it and exit. Resume later with resume.sh (or train.sh).
#   tpu_scripts/stop.sh WORKDIR
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
WORKDIR=${1:?workdir of the run}
mkdir -p "$STATE_DIR" && touch "$STATE_DIR/STOP"
logs=$(run_logs "$WORKDIR")
on_all_workers "mkdir -p ~/$logs && touch ~/$logs/STOP && (pkill -TERM -f '^.venv/bin/python -m ouro_jax.cli.train .*--workdir $WORKDIR ' || true)"
