#!/usr/bin/env bash
# Runs the same training command on every worker (jax.distributed wires them together) under
# worker_loop.sh, which logs to WORKDIR/logs/worker-N.log and reruns the command after a SIGTERM
# (preemption / maintenance: every process saved the same step, the rerun resumes from it).
#   TPU_NAME=ouro ZONE=us-east5-a tpu_scripts/train.sh configs/ouro_1p4b.py /mnt/ouro/runs/1p4b [--config.key=value ...]
# WORKDIR must be a directory every worker can write (e.g. the gcsfuse mount of setup.sh).
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
CONFIG=${1:?config file}; WORKDIR=${2:?workdir (a directory every worker can write, e.g. $MOUNT_DIR/runs/x)}; shift 2
extra=$(printf ' %q' "$@")
on_all_workers "cd ~/$REPO_DIR && $WORKER_INDEX && mkdir -p $WORKDIR/logs && rm -f $WORKDIR/logs/STOP && \
  nohup tpu_scripts/worker_loop.sh $WORKDIR/logs/worker-\$WORKER.log $WORKDIR/logs/STOP \
    .venv/bin/python -m ouro_jax.cli.train --config $CONFIG --workdir $WORKDIR --config.distributed=True$extra \
    >/dev/null 2>&1 </dev/null &"
echo "started; follow with: tpu_scripts/status.sh $WORKDIR   (all logs: tpu_scripts/logs.sh $WORKDIR)"
