"""`ouro-prepare INPUTS --output DIR` (= `python -m ouro_jax.cli.prepare`): text, JSONL or Parquet to token shards,
chat JSONL (`--chat`) to token shards with the assistant-only target mask.

The library is `ouro_jax.data.prepare`; bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ouro_jax.data import prepare as prepare_lib
from ouro_jax.errors import OneLineParser, fail

PROG = "ouro-prepare"


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=prepare_lib.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="input files or directories")
    parser.add_argument("--output", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte', or a tokenizer.json / model directory holding one (default: byte)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    parser.add_argument("--text-split", default="paragraph", choices=prepare_lib.TEXT_SPLITS,
                        help="documents of a plain-text file: blank-line separated, lines, or the whole file")
    parser.add_argument("--no-eos", action="store_true", help="do not append <|endoftext|> to documents")
    parser.add_argument("--max-shard-tokens", type=int, default=1 << 27, help="start a new shard past this")
    parser.add_argument("--chat", action="store_true",
                        help="inputs are chat JSONL ({\"messages\": [...]} per line): render with the tokenizer's chat "
                             "template and store the assistant-only target mask")
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="--chat: the chat template's enable_thinking switch (default: the template's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        manifest = prepare_lib.prepare(args.inputs, args.output, tokenizer=args.tokenizer, text_field=args.text_field,
                           text_split=args.text_split, append_eos=not args.no_eos,
                           max_shard_tokens=args.max_shard_tokens, progress=not args.no_progress,
                           overwrite=args.overwrite, chat=args.chat, enable_thinking=args.enable_thinking)
    except (prepare_lib.PrepareError, OSError, ValueError) as e:
        fail(PROG, e, code=2)
    what = "chats" if args.chat else "documents"
    print(f"wrote {manifest['documents']} {what}, {manifest['tokens']} tokens in "
          f"{len(manifest['shards'])} shard(s) to {args.output}"
          + (f" ({manifest['skipped_empty']} without an assistant message skipped)" if args.chat else ""))
    return 0


def run() -> None:
    """The `ouro-prepare` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
