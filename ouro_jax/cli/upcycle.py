"""`ouro-upcycle SRC DST [--repeats 2]` (= `python -m ouro_jax.cli.upcycle`): repeat the layer stack of a model.

The library is `ouro_jax.upcycle`; bad input ends with one line on stderr.
"""

from __future__ import annotations

from ouro_jax import upcycle
from ouro_jax.errors import OneLineParser, cli_errors

PROG = "ouro-upcycle"


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("source", help="params checkpoint, HF Ouro directory, training workdir or step, hub id")
    parser.add_argument("destination", help="where to write the upcycled params checkpoint")
    parser.add_argument("--repeats", type=int, default=2, help="copies of the layer stack (default 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a params checkpoint at DESTINATION")
    args = parser.parse_args(argv)
    with cli_errors(PROG):
        cfg = upcycle.upcycle_checkpoint(args.source, args.destination, args.repeats, overwrite=args.overwrite)
    print(f"wrote {args.destination}: {cfg.num_hidden_layers} layers ({args.repeats} x the stack of {args.source})")


def run() -> None:
    """The `ouro-upcycle` console script."""
    main()


if __name__ == "__main__":
    run()
