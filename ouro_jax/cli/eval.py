"""`ouro-eval` / `python -m ouro_jax.cli.eval`: per-step quality and the quality-vs-compute sweep.

    ouro-eval MODEL [--text FILE_OR_SHARDS ...] [--task mano:max_len=10] [--gate-from STAGE2_CKPT]
              [--thresholds 0.2,0.5,0.8] [--output DIR]

MODEL is an HF Ouro directory, an ouro_jax params checkpoint, a training workdir (its newest step)
or WORKDIR/checkpoints/STEP, or a hub id (fetched with huggingface_hub); local or gs://.
Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ouro_jax import validate
from ouro_jax.errors import ConfigError, OneLineParser, cli_errors, fail
from ouro_jax.evaluation.runner import evaluate_model
from ouro_jax.evaluation.sweep import DEFAULT_THRESHOLDS

PROG = "ouro-eval"


def _thresholds(text: str) -> list[float]:
    try:
        qs = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be numbers, got {text!r}") from None
    try:
        return validate.thresholds(qs, "Q-exit thresholds")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("model", help="HF Ouro directory, params checkpoint, training workdir or step, or hub id")
    p.add_argument("--text", action="append", default=[],
                   help="held-out text: a prepared shard directory, .jsonl or .txt (repeatable)")
    p.add_argument("--task", help="synthetic task spec, e.g. mano:max_len=10 or multihop_qa")
    p.add_argument("--gate-from", help="checkpoint whose exit gate is compared too (e.g. a Stage II run)")
    p.add_argument("--thresholds", type=_thresholds, default=list(DEFAULT_THRESHOLDS), help="Q-exit thresholds q")
    p.add_argument("--num-steps", type=int, help="recurrent steps (default: the trained T; more extrapolates)")
    p.add_argument("--seq-len", type=int, default=512, help="text row length")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=65536, help="scored text tokens per input (0: all)")
    p.add_argument("--num-examples", type=int, default=512, help="held-out task examples")
    p.add_argument("--tokenizer", help="tokenizer.json or 'byte' for .jsonl/.txt (default: the model's, else byte)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--dtype", choices=validate.COMPUTE_DTYPES, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--output", help="directory for results.json and the sweep plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _print_report(result: dict) -> None:
    for name, entry in result["text"].items():
        print(f"{name}: {entry['tokens']} tokens")
        for t, (ce, ppl) in enumerate(zip(entry["step_ce"], entry["step_perplexity"]), 1):
            print(f"  step {t}: CE {ce:.4f}  perplexity {ppl:.3f}")
        _print_sweep(entry["sweep"])
    if result["task"] is not None:
        task = result["task"]
        print(f"{task['spec']}: {task['examples']} held-out examples")
        for t, (acc, ce) in enumerate(zip(task["step_accuracy"], task["step_ce"]), 1):
            print(f"  step {t}: accuracy {acc:.4f}  answer CE {ce:.4f}")
        _print_sweep(task["sweep"])
    for stem, png in result.get("plots", {}).items():
        print(f"plot {stem}: {png}")
    if "plots_skipped" in result:
        print(result["plots_skipped"], file=sys.stderr)


def _print_sweep(result: dict) -> None:
    print(f"  {'curve':16s} {'setting':>8s} {'mean depth':>10s} {'layers/token':>12s} {result['metric']:>9s}")
    for name, points in result["curves"].items():
        for p in points:
            print(f"  {name:16s} {p['setting']:>8g} {p['mean_depth']:>10.3f} {p['layer_applications']:>12.2f} "
                  f"{p['value']:>9.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("num_steps", "seq_len", "batch_size", "num_examples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            fail(PROG, f"--{flag.replace('_', '-')} must be >= 1, got {value}", code=2)
    with cli_errors(PROG, code=2):  # EvalInputError, ConfigError, CheckpointError are ValueErrors
        result = evaluate_model(args.model, text=args.text, task=args.task, gate_from=args.gate_from,
                                thresholds=args.thresholds, num_steps=args.num_steps, seq_len=args.seq_len,
                                batch_size=args.batch_size, max_tokens=args.max_tokens or None,
                                num_examples=args.num_examples, tokenizer=args.tokenizer, text_field=args.text_field,
                                dtype=args.dtype, output_dir=args.output, progress=not args.no_progress)
    _print_report(result)
    return 0


def run() -> None:
    """The `ouro-eval` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
