#!/usr/bin/env bash
# Runs on a worker: COMMAND, appending its output to LOG, rerun while it exits by SIGTERM (status 143:
# the run saved a checkpoint, e.g. before a maintenance event) unless STOP_FILE exists (stop.sh).
#   tpu_scripts/worker_loop.sh LOG STOP_FILE COMMAND [ARGS...]
# MAX_RESTARTS (default 100) bounds the reruns; the exit status is the command's last one.
set -uo pipefail
LOG=${1:?log file}; STOP_FILE=${2:?stop file}; shift 2
: "${MAX_RESTARTS:=100}"
trap 'echo "[worker_loop] SIGTERM: waiting for the command to save and exit" >>"$LOG"' TERM
restarts=0
while true; do
  echo "[worker_loop] $(date -u +%FT%TZ) start on $(hostname): $*" >>"$LOG"
  "$@" >>"$LOG" 2>&1 &
  child=$!
  # `wait` returns early when a trapped signal arrives; wait again until the command has exited.
  while wait "$child"; status=$?; kill -0 "$child" 2>/dev/null; do :; done
  echo "[worker_loop] $(date -u +%FT%TZ) exit status $status" >>"$LOG"
  if [ "$status" -ne 143 ] || [ -e "$STOP_FILE" ] || [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    exit "$status"
  fi
  restarts=$((restarts + 1))
  echo "[worker_loop] rerun $restarts after SIGTERM (resumes from the saved checkpoint)" >>"$LOG"
done
