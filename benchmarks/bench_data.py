"""Throughput of the data pipeline on this CPU, side by side with what a training step consumes.

    .venv/bin/python benchmarks/bench_data.py                  # times the demo train step itself
    .venv/bin/python benchmarks/bench_data.py --train-tokens-per-s 25000   # or compare with a given rate

Prints, per pipeline: batch slots/s (batch_size * seq_len per batch, what a train step consumes),
real tokens/s (padding excluded) and the ratio to the train step's slots/s. Also times the prepare
CLI's tokenization. The train-step rate comes from `configs/demo.py` via `ouro_jax.train.step`
(compile once, then timed steps) unless `--train-tokens-per-s` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = pathlib.Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from ouro_jax.data import Mano, MultiHopQA, TokenShards, make_batch_iterator, make_source  # noqa: E402
from ouro_jax.data.prepare import prepare  # noqa: E402


def time_pipeline(source, *, seq_len: int, batch_size: int, seconds: float, num_workers: int = 0) -> dict:
    it = make_batch_iterator(source, seq_len=seq_len, batch_size=batch_size, num_workers=num_workers,
                             process_index=0, process_count=1)
    for _ in range(3):  # warm-up (and worker start-up)
        next(it)
    batches = real = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        real += int((next(it)["segment_ids"] > 0).sum())
        batches += 1
    it.close()
    return {"slots_per_s": batches * batch_size * seq_len / elapsed, "tokens_per_s": real / elapsed,
            "fill": real / (batches * batch_size * seq_len)}


def write_corpus(path: pathlib.Path, megabytes: float) -> None:
    rng = np.random.default_rng(0)
    words = np.array(["the", "of", "looped", "model", "token", "data", "grain", "shard", "pack", "loss",
                      "gradient", "recurrent", "exit", "gate", "step", "layer"])
    with open(path, "w") as f:
        written = 0
        while written < megabytes * 1e6:
            text = " ".join(words[rng.integers(0, len(words), rng.integers(20, 600))]) + "\n\n"
            f.write(text)
            written += len(text)


def load_train_config(config_path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("bench_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def time_train_step(config, steps: int) -> float:
    """Slots/s consumed by the jitted train step of a config (batch_size * seq_len per step)."""
    import jax

    from ouro_jax import sharding as shd
    from ouro_jax.train.step import as_model_batch, build_train_program

    mesh = shd.make_mesh(dict(config.mesh))
    program = build_train_program(config, mesh)
    state = program.init(jax.random.key(0))
    step = program.step.lower(program.abstract_state, program.abstract_batch).compile()
    seq_len, batch_size = int(config.data.seq_len), int(config.data.batch_size)
    data = make_batch_iterator(make_source(str(config.data.sources).split(";")[0]), seq_len=seq_len,
                               batch_size=batch_size, process_index=0, process_count=1)
    batches = [shd.global_batch(as_model_batch(next(data)), mesh) for _ in range(steps + 2)]
    data.close()
    for b in batches[:2]:
        state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for b in batches[2:]:
        state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    return steps * batch_size * seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-tokens-per-s", type=float, default=None,
                        help="the train step's consumption (batch slots/s) to compare with; skips timing it here")
    parser.add_argument("--train-config", default=str(REPO / "configs" / "demo.py"))
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per pipeline")
    parser.add_argument("--corpus-mb", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=2, help="also time pipelines with this many workers (0: skip)")
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    config_path = pathlib.Path(args.train_config)
    config, config_name = load_train_config(config_path), config_path.name
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        write_corpus(tmp / "corpus.txt", args.corpus_mb)
        start = time.perf_counter()
        manifest = prepare([str(tmp / "corpus.txt")], tmp / "shards", progress=False)
        prep_s = time.perf_counter() - start
        print(f"prepare (byte tokenizer): {manifest['tokens'] / prep_s:,.0f} tokens/s "
              f"({manifest['documents']} documents, {manifest['tokens']:,} tokens in {prep_s:.1f}s)")
        shards = TokenShards(tmp / "shards")
        train_seq, train_batch = int(config.data.seq_len), int(config.data.batch_size)
        train_case = f"{config.data.sources} ({config_name}: seq {train_seq}, batch {train_batch})"
        cases = [
            (train_case, make_source(str(config.data.sources).split(";")[0]), train_seq, train_batch),
            ("mano L=10 (seq 64, batch 32)", Mano(max_len=10), 64, 32),
            ("multihop_qa 3-hop (seq 64, batch 32)", MultiHopQA(), 64, 32),
            ("text shards concat (seq 1024, batch 8)", shards, 1024, 8),
        ]
        results = []
        for name, src, seq_len, batch_size in cases:
            results.append((name, time_pipeline(src, seq_len=seq_len, batch_size=batch_size, seconds=args.seconds)))
            if args.workers and name == train_case:
                results.append((f"{name}, {args.workers} workers", time_pipeline(
                    src, seq_len=seq_len, batch_size=batch_size, seconds=args.seconds, num_workers=args.workers)))

    if args.train_tokens_per_s is not None:
        train_rate, train_desc = args.train_tokens_per_s, "given by --train-tokens-per-s"
    else:
        train_rate, train_desc = time_train_step(config, args.train_steps), f"{config_name} train step"
    print(f"train step consumption: {train_rate:,.0f} slots/s [{train_desc}]")
    print(f"{'pipeline':<66} {'slots/s':>12} {'tokens/s':>12} {'fill':>6} {'x train':>8}")
    for name, r in results:
        print(f"{name:<66} {r['slots_per_s']:12,.0f} {r['tokens_per_s']:12,.0f} {r['fill']:6.2f} "
              f"{r['slots_per_s'] / train_rate:8.1f}")


if __name__ == "__main__":
    main()
