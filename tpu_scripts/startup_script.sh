#!/usr/bin/env bash
# Prints a queued-resource startup script (create.sh STARTUP_SCRIPT=FILE) that, on every boot of every
# worker, clones REPO_URL, installs it (setup_commands), and starts the run as USER_NAME: a slice that is
# recreated or restarted resumes the run without any ssh.
#   REPO_URL=https://... tpu_scripts/startup_script.sh CONFIG WORKDIR [--config.key=value ...] > boot.sh
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "$0")/common.sh"
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
: "${REPO_URL:?a startup script cannot copy this checkout: set REPO_URL}"
: "${USER_NAME:=$(id -un)}"
clone="if [ ! -d ~/$REPO_DIR/.git ]; then rm -rf ~/$REPO_DIR; git clone -q $REPO_URL ~/$REPO_DIR; fi"
start="cd ~/$REPO_DIR && tpu_scripts/worker_start.sh$(printf ' %q' "$(run_logs "$WORKDIR")" "$CONFIG" "$WORKDIR" "$@")"
cat <<SCRIPT
#!/bin/bash
# ouro_jax startup script for $TPU_NAME (tpu_scripts/startup_script.sh)
runuser -l $(printf %q "$USER_NAME") -c $(printf %q "$clone; $(setup_commands); $start")
SCRIPT
