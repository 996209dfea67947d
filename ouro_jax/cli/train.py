"""Training CLI: `ouro-train --config configs/<name>.py --workdir DIR [--config.k=v ...]`.

Also `python -m ouro_jax.cli.train`. Expected errors (bad flags, configs, checkpoints, data) end with one
line on stderr and a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Collection

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ouro_jax.cli import flags_parser
from ouro_jax.errors import cli_errors
from ouro_jax.train.loop import TrainingInterrupted, report, train
from ouro_jax.train.settings import RunSettings

PROG = "ouro-train"


def _main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    main(flags.FLAGS.config, flags.FLAGS.workdir, debug=flags.FLAGS.debug,
         explicit_fields=explicit_model_fields(flags.FLAGS["config"]))


def main(config, workdir: str, *, debug: bool = False, explicit_fields: Collection[str] = ()) -> None:
    """The command after flag parsing: trains, prints the report; expected errors end in one line.
    `explicit_fields`: the config.model fields set on the command line (they win over `init_from`)."""
    try:
        with cli_errors(PROG, debug=debug):
            run = RunSettings.of(config)  # the typed settings everything below takes
            if run.distributed:
                _initialize_distributed()
            result = train(run, workdir, explicit_fields)
    except TrainingInterrupted as e:
        print(f"[train] {e}", flush=True)
        sys.exit(128 + e.signum)
    print(report(result), flush=True)


def explicit_model_fields(config_flag) -> set[str]:
    """The `config.model` fields set on the command line (`--config.model.K=V`)."""
    return {key.split(".", 1)[1] for key in config_flags.get_override_values(config_flag) if key.startswith("model.")}


def _initialize_distributed() -> None:
    """Joins the processes of a multi-host run. On TPU VMs and known clusters every argument is detected;
    elsewhere (e.g. several CPU processes on one machine) the --coordinator_address / --num_processes /
    --process_id flags (or JAX_COORDINATOR_ADDRESS) say who is who."""
    f = flags.FLAGS
    jax.distributed.initialize(coordinator_address=f.coordinator_address or None,
                               num_processes=f.num_processes if f.num_processes > 0 else None,
                               process_id=f.process_id if f.process_id >= 0 else None)


def run() -> None:
    """The `ouro-train` console script."""
    config_flags.DEFINE_config_file("config", None, "training config file (configs/<name>.py)", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the exported params")
    flags.DEFINE_boolean("debug", False, "show the traceback of an expected error")
    flags.DEFINE_string("coordinator_address", "", "with --config.distributed: host:port of process 0 ('' = detect)")
    flags.DEFINE_integer("num_processes", 0, "with --config.distributed: number of processes (0 = detect)")
    flags.DEFINE_integer("process_id", -1, "with --config.distributed: this process's index (-1 = detect)")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(_main, flags_parser=flags_parser(PROG))


if __name__ == "__main__":
    run()
