"""`ouro-aot --config CONFIG --topology v5p:2x2x1` (= `python -m ouro_jax.cli.aot`): AOT-compile the train step.

`--config.mesh.slices=2` compiles for two such slices joined by the data-center network (multislice).

The library is `ouro_jax.train.aot`; it needs libtpu (`pip install "jax[tpu]"`), not a TPU. Exit 0 when the
step fits the chip's HBM, 1 when it does not; bad input ends with one line on stderr.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from ouro_jax.cli import flags_parser
from ouro_jax.errors import cli_errors
from ouro_jax.train.aot import DoesNotFit, compile_train_step, max_batch_per_chip
from ouro_jax.train.roofline import roofline

PROG = "ouro-aot"


def main(config, topology: str, batch_per_chip: int, find_max_batch: bool, with_roofline: bool = False) -> int:
    """The command after flag parsing; returns the exit status."""
    with cli_errors(PROG):
        if with_roofline:
            print(roofline(config, topology, batch_per_chip))
        if find_max_batch:
            best, _ = max_batch_per_chip(config, topology)
            print(f"largest batch per chip that fits on {topology}: {best} "
                  f"({best * int(config.data.seq_len)} tokens per chip)")
            return 0 if best else 1
        try:
            report = compile_train_step(config, topology, batch_per_chip)
        except DoesNotFit as e:
            print(e)
            return 1
    print(report)
    return 0 if report.fits else 1


def run() -> None:
    """The `ouro-aot` console script."""
    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=False)
    flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology of one slice, e.g. v5p:2x2x1, v6e:2x4, v5p:4x4x4 "
                        "(--config.mesh.slices=N: N of them)")
    flags.DEFINE_integer("batch_per_chip", 1, "sequences per chip (per microbatch with grad_accum)")
    flags.DEFINE_bool("find_max_batch", False, "search the largest per-chip batch that fits")
    flags.DEFINE_bool("roofline", False, "also print a roofline ESTIMATE of step time and MFU (four more compiles)")
    flags.mark_flags_as_required(["config"])
    f = flags.FLAGS
    app.run(lambda argv: sys.exit(main(f.config, f.topology, f.batch_per_chip, f.find_max_batch, f.roofline)),
            flags_parser=flags_parser(PROG))


if __name__ == "__main__":
    run()
