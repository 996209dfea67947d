#!/usr/bin/env bash
# Sends SIGTERM to the training processes: they save a checkpoint and exit; resume with train.sh.
source "$(dirname "$0")/common.sh"
on_all_workers "pkill -TERM -f 'ouro_jax.train' || true"
