#!/usr/bin/env bash
# Reruns the last train.sh command of this slice (STATE_DIR/run): the run resumes from its newest checkpoint.
#   TPU_NAME=ouro ZONE=us-east5-a tpu_scripts/resume.sh
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
[ -s "$STATE_DIR/run" ] || { echo "no run recorded in $STATE_DIR/run: start one with train.sh" >&2; exit 1; }
eval "set -- $(cat "$STATE_DIR/run")"
exec "$(dirname "$0")/train.sh" "$@"
