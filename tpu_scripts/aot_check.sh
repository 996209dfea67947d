#!/usr/bin/env bash
# Compiles a config's train step for a TPU topology on this machine (no TPU needed; libtpu from
# requirements-dev.txt) and prints memory per chip; --find_max_batch searches the largest batch.
#   tpu_scripts/aot_check.sh configs/ouro_1p4b.py v5p:2x2x1 [--find_max_batch] [--config.data.seq_len=4096]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?config file}; TOPOLOGY=${2:?topology, e.g. v5p:2x2x1}; shift 2
JAX_PLATFORMS=cpu exec .venv/bin/ouro-aot --config "$CONFIG" --topology "$TOPOLOGY" "$@"
