#!/usr/bin/env bash
# Runs the same training command on every host; jax.distributed wires the hosts together.
#   TPU_NAME=ouro ZONE=us-east5-a tpu_scripts/train.sh configs/ouro_1p4b.py /mnt/bucket/runs/1p4b [--config.key=value ...]
source "$(dirname "$0")/common.sh"
CONFIG=${1:?config file}; WORKDIR=${2:?workdir (a directory every host can write, e.g. a mounted bucket)}; shift 2
on_all_workers "cd $REPO_DIR && nohup .venv/bin/python -m ouro_jax.train --config $CONFIG --workdir $WORKDIR --config.distributed=True $* \
  > train.log 2>&1 &"
echo "started; follow with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f $REPO_DIR/train.log'"
