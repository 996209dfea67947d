"""Prefill, forward+backward and the full train step, ouro_jax beside transformers on the same weights.

    .venv/bin/python benchmarks/bench_vs_transformers.py [--repeats 5] [--loops unrolled scan]

Config: d=512, SwiGLU 1408, 4 layers, T=4, 8 heads of 64, vocab 8192, batch 4 x 512 tokens, float32.
transformers runs `ouro_jax.hf.export_hf` of the same randomly initialized weights (trust_remote_code,
SDPA attention): prefill = `model(ids, use_cache=True, logits_to_keep=1)`; forward+backward =
`model(ids, labels=ids).loss.backward()` (every step's logits, the exit-pdf mixture's cross-entropy);
train step = that plus `torch.optim.AdamW` and gradient clipping. ouro_jax: prefill = `generate` with
one new token (every step, the KV cache, the last position's logits); forward+backward = the Stage I
loss (every step's cross-entropy, the gate's entropy) and its gradient; train step = the jitted
`build_train_program` step (AdamW, clipping, non-finite checks). Times are the median of `--repeats`
runs after a warm-up (compilation excluded); each repeat runs every contestant once, in turn, so a slow
spell of a shared machine hits all of them alike. Ratios > 1 mean ouro_jax is faster.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_decode import transformers_model  # noqa: E402
from bench_train import bench_model  # noqa: E402

from ouro_jax import sharding as shd  # noqa: E402
from ouro_jax.inference import generate  # noqa: E402
from ouro_jax.train.config import base_config, model_fields  # noqa: E402
from ouro_jax.train.step import batch_loss_sums, build_train_program  # noqa: E402

BATCH, SEQ = 4, 512


def bench_config(unroll: bool):
    c = base_config()
    c.model = model_fields(bench_model(2 * SEQ))
    c.execution.update(dtype="float32", unroll=unroll)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.data.update(seq_len=SEQ, batch_size=BATCH)
    c.train.update(steps=1000, ce_chunk_size=SEQ)
    return c


MEASURES = ("prefill", "forward+backward", "train step")


def median_times(contestants: dict[str, dict], repeats: int) -> dict[str, dict[str, float]]:
    """Seconds per call, the median of `repeats` rounds after a warm-up; each round times every
    contestant's every measure once, in turn."""
    for runs in contestants.values():
        for fn in runs.values():
            fn()   # warm-up / compilation
    times = {name: {m: [] for m in runs} for name, runs in contestants.items()}
    for _ in range(repeats):
        for measure in MEASURES:
            for name, runs in contestants.items():
                start = time.perf_counter()
                runs[measure]()
                times[name][measure].append(time.perf_counter() - start)
    return {name: {m: float(np.median(t)) for m, t in by.items()} for name, by in times.items()}


def batch_of(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
            "loss_mask": np.ones((BATCH, SEQ), np.float32)}


def ouro_jax_runs(unroll: bool, ids: np.ndarray):
    """The three measures as callables, and the model config and initial params."""
    config = bench_config(unroll)
    mesh = shd.make_mesh(dict(config.mesh), jax.devices()[:1])
    program = build_train_program(config, mesh)
    state = program.init(jax.random.key(0))
    params = jax.device_get(state.params)
    batch = shd.global_batch(batch_of(ids), mesh)
    cfg = program.model_cfg

    def loss(p, b):
        total, _ = batch_loss_sums(cfg, p, b, objective="stage1", beta=0.1, gate_k=0.0, gate_gamma=0.0,
                                   ce_chunk_size=SEQ)
        return total / (BATCH * SEQ)

    grad = jax.jit(jax.value_and_grad(loss))
    prompts = ids[:, :SEQ]

    def train_step():
        nonlocal state
        state, metrics = program.step(state, batch)
        jax.block_until_ready(metrics)

    runs = {"prefill": lambda: generate(cfg, params, prompts, max_new_tokens=1),
            "forward+backward": lambda: jax.block_until_ready(grad(state.params, batch)), "train step": train_step}
    return runs, cfg, params


def transformers_runs(cfg, params, ids: np.ndarray):
    import torch

    model = transformers_model(cfg, params)
    prompts = inputs = torch.tensor(ids[:, :SEQ], dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def prefill():
        model.eval()
        with torch.inference_mode():
            model(prompts, use_cache=True, logits_to_keep=1)

    def forward_backward():
        model.train()
        model.zero_grad(set_to_none=True)
        model(inputs, labels=inputs).loss.backward()

    def train_step():
        forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return {"prefill": prefill, "forward+backward": forward_backward, "train step": train_step}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loops", nargs="+", default=["unrolled", "scan"], choices=["unrolled", "scan"])
    args = parser.parse_args()
    import torch

    ids = np.random.default_rng(0).integers(3, 8192, (BATCH, SEQ + 1), dtype=np.int32)
    contestants = {}
    for loops in args.loops:
        contestants[f"ouro_jax {loops}"], cfg, params = ouro_jax_runs(loops == "unrolled", ids)
    contestants["transformers"] = transformers_runs(cfg, params, ids)
    times = median_times(contestants, args.repeats)
    theirs = times.pop("transformers")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), batch {BATCH} x {SEQ} tokens, float32")
    print(f"{'tokens/s':>18} | {'transformers':>12} | " + " | ".join(f"{name:>17} | ratio" for name in times))
    for measure in MEASURES:
        row = f"{measure:>18} | {BATCH * SEQ / theirs[measure]:12.0f} | "
        row += " | ".join(f"{BATCH * SEQ / t[measure]:17.0f} | {theirs[measure] / t[measure]:4.2f}x"
                          for t in times.values())
        print(row)


if __name__ == "__main__":
    main()
