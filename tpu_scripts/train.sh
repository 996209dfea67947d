#!/usr/bin/env bash
# Runs the same training command on every worker (jax.distributed wires them together) under
# worker_loop.sh, which logs to ~/ouro_logs/<run>/worker-N.log on each worker and reruns the command after
# a SIGTERM (preemption / maintenance: every process saved the same step, the rerun resumes from it).
#   TPU_NAME=ouro ZONE=us-east5-a tpu_scripts/train.sh configs/ouro_1p4b.py gs://BUCKET/runs/1p4b [--config.key=value ...]
# WORKDIR: a gs:// URI (read and written directly) or a directory every worker can write (e.g. the
# gcsfuse mount of setup.sh). The command is kept in STATE_DIR/run for resume.sh and babysit.sh.
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
CONFIG=${1:?config file}; WORKDIR=${2:?workdir (gs://... or a directory every worker can write)}; shift 2
mkdir -p "$STATE_DIR"
printf '%q ' "$CONFIG" "$WORKDIR" "$@" >"$STATE_DIR/run"
rm -f "$STATE_DIR/STOP"
args=$(printf ' %q' "$(run_logs "$WORKDIR")" "$CONFIG" "$WORKDIR" "$@")
on_all_workers "cd ~/$REPO_DIR && tpu_scripts/worker_start.sh$args"
echo "started; follow with: tpu_scripts/status.sh $WORKDIR   (all logs: tpu_scripts/logs.sh $WORKDIR)"
