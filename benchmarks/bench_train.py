"""Train-step throughput and MFU on this machine, next to the measured matmul peak in the same run.

    .venv/bin/python benchmarks/bench_train.py [--steps 5] [--dtype float32 bfloat16] [--loops scan unrolled]

Model: d=512, 4 layers, T=4 (8 heads of 64, SwiGLU 1408, vocab 8192), Stage I objective, batch 8 x 256
tokens; the loops over layers and steps either as nn.scan (the default, for compile time at scale) or
unrolled (`execution.unroll`: the same params, faster on CPU). Model FLOPs are analytic
(ouro_jax.train.metrics.model_flops_per_token: every matmul of the T loops, the LM head at every step,
attention; x3 for the backward pass; no rematerialization).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ouro_jax import config as presets  # noqa: E402
from ouro_jax import sharding as shd  # noqa: E402
from ouro_jax.train.config import base_config, model_fields  # noqa: E402
from ouro_jax.train.metrics import measure_matmul_flops, model_flops_per_token  # noqa: E402
from ouro_jax.train.step import build_train_program  # noqa: E402

BATCH, SEQ = 8, 256


def bench_model(max_positions: int):
    """The benchmarks' model: d=512, SwiGLU 1408, 4 layers, T=4, 8 heads of 64, vocab 8192."""
    return presets.tiny(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8, head_dim=64, total_ut_steps=4,
                        max_position_embeddings=max_positions)


def bench_config(dtype: str, remat: str, scan: bool):
    c = base_config()
    c.model = model_fields(bench_model(SEQ))
    c.execution.update(dtype=dtype, remat_policy=remat, unroll=not scan)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.data.update(seq_len=SEQ, batch_size=BATCH)
    c.train.update(steps=1000, ce_chunk_size=SEQ)
    return c


def random_batch(vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(3, vocab, (BATCH, SEQ + 1), dtype=np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
            "loss_mask": np.ones((BATCH, SEQ), np.float32)}


def time_train_step(dtype: str, remat: str, scan: bool, steps: int) -> tuple[float, float]:
    """(seconds per step, model FLOPs per step)."""
    config = bench_config(dtype, remat, scan)
    mesh = shd.make_mesh(dict(config.mesh), jax.devices()[:1])
    program = build_train_program(config, mesh)
    state = program.init(jax.random.key(0))
    batch = shd.global_batch(random_batch(program.model_cfg.vocab_size, np.random.default_rng(0)), mesh)
    state, metrics = program.step(state, batch)          # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = program.step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    flops = model_flops_per_token(program.model_cfg, SEQ) * BATCH * SEQ
    return float(np.median(times)), flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none")
    parser.add_argument("--loops", nargs="+", default=["scan", "unrolled"], choices=["scan", "unrolled"])
    args = parser.parse_args()
    print(f"devices: {jax.devices()[0].device_kind} x1, batch {BATCH} x {SEQ} tokens, remat {args.remat}")
    print(f"{'compute':>9} | {'loops':>8} | {'s/step':>7} | {'tokens/s':>9} | {'model GFLOP/s':>13} | "
          f"{'matmul peak GFLOP/s':>19} | ratio")
    for dtype in args.dtype:
        peak = measure_matmul_flops(dtype, size=1024)
        for loops in args.loops:
            seconds, flops = time_train_step(dtype, args.remat, loops == "scan", args.steps)
            achieved = flops / seconds
            print(f"{dtype:>9} | {loops:>8} | {seconds:7.3f} | {BATCH * SEQ / seconds:9.0f} | "
                  f"{achieved / 1e9:13.1f} | {peak / 1e9:19.1f} | {achieved / peak:5.1%}")


if __name__ == "__main__":
    main()
