#!/usr/bin/env bash
# Runs a training run to its end unattended: creates the slice if there is none, sets it up, starts the
# run, then checks every CHECK_SECONDS. A preempted slice (queued resource SUSPENDED, FAILED or gone) is
# deleted, recreated, set up again and the run resumed from its newest checkpoint, at most MAX_RECREATES
# times. Ends 0 when every worker's run finished, 1 when one failed or the limit is reached, 0 after
# stop.sh. Every action goes to STATE_DIR/babysit.log (and stdout).
#   TPU_NAME=ouro ZONE=us-east5-a SPOT=1 nohup tpu_scripts/babysit.sh configs/ouro_1p4b.py gs://B/runs/x [--config.k=v ...] &
# With STARTUP_SCRIPT=1 the slice gets a startup script (startup_script.sh, needs REPO_URL) that sets up
# and starts the run at every boot, instead of setup.sh + train.sh over ssh.
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
: "${CHECK_SECONDS:=300}"; : "${MAX_RECREATES:=20}"; : "${STARTUP_SCRIPT:=0}"
here=$(dirname "$0")
mkdir -p "$STATE_DIR"
rm -f "$STATE_DIR/STOP"
LOG=$STATE_DIR/babysit.log
logs=$(run_logs "$WORKDIR")
note() { echo "[babysit] $(date -u +%FT%TZ) $*" | tee -a "$LOG"; }

# Creates the slice (WAIT_MINUTES applies) and starts the run on it.
bring_up() {
  if [ "$STARTUP_SCRIPT" = 1 ]; then
    "$here/startup_script.sh" "$CONFIG" "$WORKDIR" "$@" >"$STATE_DIR/startup.sh"
    STARTUP_SCRIPT="$STATE_DIR/startup.sh" "$here/create.sh" >>"$LOG" 2>&1 || return 1
    printf '%q ' "$CONFIG" "$WORKDIR" "$@" >"$STATE_DIR/run"
    return 0
  fi
  STARTUP_SCRIPT='' "$here/create.sh" >>"$LOG" 2>&1 || return 1
  "$here/setup.sh" >>"$LOG" 2>&1 || return 1
  "$here/train.sh" "$CONFIG" "$WORKDIR" "$@" >>"$LOG" 2>&1
}

# Last worker_loop.sh line of every worker's log: "running", "exit status N", or "no log".
worker_states() {
  on_all_workers "$WORKER_INDEX; f=~/$logs/worker-\$WORKER.log; \
    if pgrep -f '[w]orker_loop.sh .*/$logs/' >/dev/null; then echo running; \
    elif [ -f \$f ]; then grep '^\[worker_loop\].*exit status' \$f | tail -n 1 | sed 's/.* exit status/exit status/'; \
    else echo 'no log'; fi" 2>/dev/null || echo unreachable
}

recreates=0
state=$(queued_state)
note "start: queued resource $TPU_NAME is $state; run $CONFIG in $WORKDIR"
if [ "$state" = NOT_FOUND ]; then bring_up "$@" || note "bring-up failed; retrying"; fi
while true; do
  if [ -e "$STATE_DIR/STOP" ]; then note "STOP found (stop.sh): not supervising any more"; exit 0; fi
  state=$(queued_state)
  case "$state" in
    ACTIVE)
      states=$(worker_states)
      if [ -n "$states" ] && ! grep -qv '^exit status 0$' <<<"$states"; then
        note "the run finished on every worker"; exit 0
      fi
      if grep -q '^exit status [1-9]' <<<"$states" && ! grep -q '^running$' <<<"$states"; then
        note "the run failed: $(tr '\n' ' ' <<<"$states"); see tpu_scripts/logs.sh $WORKDIR"; exit 1
      fi ;;
    SUSPENDED|FAILED|NOT_FOUND|SUSPENDING)
      if [ "$recreates" -ge "$MAX_RECREATES" ]; then
        note "queued resource $state after $recreates recreations (MAX_RECREATES): giving up"; exit 1
      fi
      recreates=$((recreates + 1))
      note "queued resource $state (preempted?): recreation $recreates of $MAX_RECREATES"
      if [ "$state" != NOT_FOUND ]; then "$here/delete.sh" >>"$LOG" 2>&1 || note "delete failed"; fi
      if bring_up "$@"; then note "recreated; the run resumes from its newest checkpoint"; else note "bring-up failed"; fi
      continue ;;
  esac
  sleep "$CHECK_SECONDS"
done
