"""`ouro-serve --model DIR` (= `python -m ouro_jax.cli.serve`): an OpenAI-compatible HTTP server.

The library is `ouro_jax.serve` (continuous batching over `--slots` decode slots, per-request early
exit); this module only parses arguments, loads the model and serves until interrupted.
`--aot TOPOLOGY` instead compiles the serving programs for a TPU topology (libtpu, no TPU; `--model`
may then be a preset name) and prints each program's memory per chip: exit 0 when all fit, 1 if not.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence

from ouro_jax import config as presets
from ouro_jax.config import Execution
from ouro_jax.errors import OneLineParser, cli_errors, fail
from ouro_jax.inference import POLICIES
from ouro_jax.model_source import model_tokenizer, resolve_model
from ouro_jax.params_io import load_model, load_model_config
from ouro_jax.serve.server import Running, build_server, cache_length, checked_shape, parse_mesh
from ouro_jax.sharding import make_mesh

__all__ = ["build_parser", "main", "run"]

PROG = "ouro-serve"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF Ouro directory or ouro_jax params checkpoint")
    p.add_argument("--model-name", help="the model id clients name (default: --model)")
    p.add_argument("--tokenizer", help="tokenizer.json, a directory holding one, or 'byte' (default: the model's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (one compiled decode step)")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per sequence, prompt and generated")
    p.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens prefilled between decode steps")
    p.add_argument("--policy", default="full", help=f"KV-cache policy: {', '.join(POLICIES)}")
    p.add_argument("--depth", type=int, help="the most recurrent steps a request may ask for (default: T)")
    p.add_argument("--exit-threshold", type=float, help="default Q-exit q of a request (default: the config's)")
    p.add_argument("--timeout", type=float, default=600.0, help="default request timeout in seconds")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--no-compact", action="store_true",
                   help="run every slot until all have exited (batch-level exit) instead of compacting live rows")
    p.add_argument("--mesh", help="device mesh, e.g. 'tensor=4' or 'data=2,tensor=4' (default: one device)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: the checkpoint's; with --aot: bfloat16, weights too)")
    p.add_argument("--aot", metavar="TOPOLOGY",
                   help="compile the serving programs for a TPU topology (e.g. v6e:2x2) and print their memory "
                        "per chip instead of serving (--mesh default: tensor over every chip)")
    return p


def _aot(args) -> int:
    """`--aot`: the serve programs' memory per chip on the topology (and the arithmetic of one device)."""
    from ouro_jax.serve.aot import compile_serve_programs, serve_memory  # needs libtpu

    dtype = args.dtype or "bfloat16"
    cfg = (presets.preset(args.model) if args.model in presets.PRESETS else
           load_model_config(args.model)).with_execution(dtype=dtype, param_dtype=dtype)
    slots, max_len, chunk, depth = checked_shape(cfg, args.slots, args.max_len, args.prefill_chunk, args.depth)
    options = dict(slots=slots, cache_length=cache_length(max_len, chunk), policy=args.policy, depth=depth)
    print(f"{args.model} ({dtype}), one device: {serve_memory(cfg, **options)}", flush=True)
    reports = compile_serve_programs(cfg, args.aot, parse_mesh(args.mesh or "tensor=-1"), prefill_chunk_size=chunk,
                                     compact=not args.no_compact, **options)
    for report in reports:
        print(report)
    return 0 if all(r.fits for r in reports) else 1


def main(argv: Sequence[str] | None = None, ready: threading.Event | None = None,
         stop: threading.Event | None = None) -> int:
    """Serves until SIGINT/SIGTERM (or `stop` is set); `ready` is set once it listens."""
    args = build_parser().parse_args(argv)
    if args.policy not in POLICIES:
        fail(PROG, f"unknown --policy {args.policy!r}; choose from {', '.join(POLICIES)}")
    if args.aot:
        with cli_errors(PROG):
            return _aot(args)
    try:
        source = resolve_model(args.model)
        cfg, params = load_model(source, execution=Execution(dtype=args.dtype) if args.dtype else None)
    except (ValueError, OSError) as e:
        fail(PROG, f"cannot load --model {args.model}: {e}")
    with cli_errors(PROG):
        mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None
        server = build_server(cfg, params, model_tokenizer(source, args.tokenizer), model_name=args.model_name or
                              args.model, slots=args.slots, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
                              policy=args.policy, depth=args.depth, exit_threshold=args.exit_threshold,
                              timeout=args.timeout, max_queue=args.max_queue, compact=not args.no_compact,
                              mesh=mesh, tokenizer_dir=source.tokenizer_dir)
        running = Running(server, args.host, args.port)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    print(f"{PROG}: serving {server.model_name} on {running.url} ({args.slots} slots x {args.max_len} tokens)",
          flush=True)
    if ready is not None:
        ready.set()
    stop.wait()
    running.close()
    return 0


def run() -> None:
    """The `ouro-serve` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
