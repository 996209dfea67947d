"""`ouro-export CHECKPOINT OUT_DIR` (= `python -m ouro_jax.cli.export`): a checkpoint to a Hugging Face directory.

CHECKPOINT is any model spec of `ouro_jax.model_source`: an ouro_jax params checkpoint, a training
workdir (its newest step) or WORKDIR/checkpoints/STEP, a hub id, or an HF Ouro directory (re-exported
with our remote code and the correct special ids); local or gs://. The result loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import sys

from ouro_jax.errors import OneLineParser, cli_errors
from ouro_jax.hf.export import DEFAULT_MAX_SHARD_SIZE, EXPORT_DTYPES
from ouro_jax.params_io import export_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="ouro-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="params checkpoint, training workdir or step, HF Ouro directory, or hub id")
    parser.add_argument("out_dir", help="HF directory to create")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default=None,
                        help="stored weight dtype (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="split the weights into shards with an index above this size (bytes, or e.g. 5GB)")
    parser.add_argument("--tokenizer", default=None, help="directory (or file) of tokenizer files to copy")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli_errors("ouro-export"):  # existing target, missing/corrupt checkpoint, bad size or config
        out = export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                                overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def run() -> None:
    """The `ouro-export` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
