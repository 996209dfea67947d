"""Decode speed on this CPU: batched throughput, early exit, self-speculative decoding, each beside
PyTorch/transformers `generate()` on our export of the same weights.

    python benchmarks/bench_decode.py --params /tmp/infer_demo/params     # the trained demo model
    python benchmarks/bench_decode.py                                     # a random model (d=256, 4 layers)

Decode tokens/s = B (G - 1) new tokens / (time for G tokens - time for 1 token), so prefill and the
first token are excluded; each time is the best of `--repeats` runs after a warm-up (compilation
excluded). transformers runs `ouro_jax.hf.export_hf` of the same weights with trust_remote_code
(every recurrent step for every token, as the released code does), greedy, float32, and its tokens
are compared with ours. With a trained model the prompts are packed documents of its training task
(`--task`); a random model gets random prompts and an exit-gate bias (`--gate-bias`) so that Q-exit
stops after 1-3 steps.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ouro_jax import config, model  # noqa: E402
from ouro_jax.data import make_task  # noqa: E402
from ouro_jax.inference import generate  # noqa: E402
from ouro_jax.params_io import load_model  # noqa: E402


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_rate(run, new_tokens: int, batch: int, repeats: int) -> float:
    """Decode tokens/s over the batch: (G - 1) tokens per row beyond the prefill's first one."""
    run(new_tokens), run(1)  # warm-up / compilation
    return batch * (new_tokens - 1) / max(best_time(lambda: run(new_tokens), repeats)
                                          - best_time(lambda: run(1), repeats), 1e-9)


def jax_decode(cfg, params, prompts, new_tokens, repeats, **kw):
    """(decode tokens/s, the result of a full run); one compiled program (fixed cache length) for both lengths."""
    length = generate(cfg, params, prompts, max_new_tokens=new_tokens, **kw).cache_length
    run = lambda n: generate(cfg, params, prompts, max_new_tokens=n, cache_length=length, **kw)
    return decode_rate(run, new_tokens, len(prompts), repeats), run(new_tokens)


def transformers_model(cfg, params):
    """Our HF export of `params` (float32), loaded by transformers with trust_remote_code: the baseline."""
    import torch
    from transformers import AutoModelForCausalLM

    from ouro_jax.hf.export import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = export_hf(os.path.join(tmp, "ouro"), cfg, jax.device_get(params), dtype="float32")
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)


class TorchDecoder:
    """transformers generate() on our HF export of the same weights (greedy, float32)."""

    def __init__(self, cfg, params):
        import torch

        self.torch, self.cfg = torch, cfg
        self.model = transformers_model(cfg, params).eval()

    def generate(self, prompts, new_tokens):
        """The [B, new_tokens] greedy ids after equal-length `prompts`."""
        ids = self.torch.tensor(prompts)
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.cfg.pad_token_id)
        return out[:, ids.shape[1]:].numpy()

    def rate(self, prompts, new_tokens, repeats):
        run = lambda n: self.generate(prompts, n)
        return decode_rate(run, new_tokens, len(prompts), repeats), run(new_tokens)


def load(args):
    """(cfg, params, prompts(batch) -> [B, P] ids, description)."""
    if args.params:
        cfg, params = load_model(args.params)
        name, _, options = args.task.partition(":")
        task = make_task(name, **{k: int(v) for k, v in (kv.split("=") for kv in options.split(",") if kv)})

        def prompts(batch):   # packed training documents of the task, cut to the prompt length
            rows = []
            for b in range(batch):
                docs = [np.concatenate(task.train_example(1000 + b, i)) for i in range(args.prompt_len)]
                rows.append(np.concatenate(docs)[:args.prompt_len].tolist())
            return rows

        return cfg, params, prompts, f"trained {args.params} ({args.task} prompts)"
    heads = max(1, args.hidden // 64)
    cfg = config.tiny(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      head_dim=args.hidden // heads, max_position_embeddings=4096)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    params = {**params, "exit_gate": {**params["exit_gate"], "bias": params["exit_gate"]["bias"] + args.gate_bias}}
    rng = np.random.default_rng(0)
    return cfg, params, lambda batch: rng.integers(3, cfg.vocab_size, (batch, args.prompt_len)).tolist(), "random"


def table(header, rows):
    print("\n" + "".join(f"{h:>{w}}" for h, w in header))
    for row in rows:
        print("".join(f"{v:>{w}}" if isinstance(v, str) else f"{v:>{w}.2f}" for v, (_, w) in zip(row, header)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", help="a trained params checkpoint (default: a random model)")
    p.add_argument("--task", default="mano:max_len=2,modulus=5", help="prompt source for --params")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--threshold", type=float, default=0.5, help="Q-exit q of the early-exit runs")
    p.add_argument("--gate-bias", type=float, default=-0.5, help="exit-gate bias of the random model")
    p.add_argument("--drafts", default="1:2,1:4,1:8,2:4,2:8", help="speculative settings draft_depth:draft_tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)

    cfg, params, prompts, source = load(args)
    T, N, G = cfg.total_ut_steps, cfg.num_hidden_layers, args.new_tokens
    print(f"model: {source}; d={cfg.hidden_size}, N={N} x T={T}, vocab {cfg.vocab_size}, "
          f"{model.count_params(params) / 1e6:.2f}M params; prompt {args.prompt_len}, {G} new tokens, greedy, "
          f"float32; {os.cpu_count()} CPU cores")
    torch = None if args.no_torch else TorchDecoder(cfg, params)

    rows = []
    for batch in map(int, args.batches.split(",")):
        ids = prompts(batch)
        ours, result = jax_decode(cfg, params, ids, G, args.repeats)
        theirs, tokens = torch.rate(ids, G, args.repeats) if torch else (float("nan"), None)
        same = "-" if tokens is None else ("yes" if np.array_equal(tokens, result.tokens) else "NO")
        rows.append((str(batch), ours, theirs, ours / theirs, same))
    print("\n== batched decode, full depth: ouro_jax vs transformers generate() (decode tokens/s)")
    table([("batch", 6), ("ouro_jax", 12), ("transformers", 14), ("ratio", 8), ("same tokens", 13)], rows)

    rows = []
    for batch in (1, 8):
        ids = prompts(batch)
        full, _ = jax_decode(cfg, params, ids, G, args.repeats)
        early, result = jax_decode(cfg, params, ids, G, args.repeats, exit_threshold=args.threshold)
        depth = float(result.depths[:, 1:].mean())
        steps = result.decode_steps / (G - 1)   # the batch loops until its deepest row exits
        rows.append((str(batch), full, early, depth, steps, early / full, T / depth, early / full / (T / depth),
                     early / full / (T / steps)))
    print(f"\n== early exit (Q-exit q = {args.threshold}, exit_mode='early') vs full depth")
    table([("batch", 6), ("full tok/s", 12), ("Q-exit tok/s", 14), ("mean depth", 12), ("steps/pos", 11),
           ("speed-up", 10), ("T/mean depth", 14), ("vs T/depth", 12), ("vs T/steps", 12)], rows)

    ids = prompts(1)
    full, base = jax_decode(cfg, params, ids, G, args.repeats)
    theirs, _ = torch.rate(ids, G, args.repeats) if torch else (float("nan"), None)
    rows = [("full depth (no draft)", "-", "-", full, 1.0, full / theirs, "-")]
    for setting in args.drafts.split(","):
        depth, k = map(int, setting.split(":"))
        rate, result = jax_decode(cfg, params, ids, G, args.repeats, draft_tokens=k, draft_depth=depth)
        same = "yes" if np.array_equal(result.tokens, base.tokens) else "NO"
        rows.append((f"draft depth {depth}, k = {k}", f"{result.acceptance_rate:.2f}",
                     f"{(G - 1) / max(result.draft_rounds, 1):.2f}", rate, rate / full, rate / theirs, same))
    print(f"\n== self-speculative greedy decoding, batch 1 (transformers: {theirs:.1f} tok/s)")
    table([("setting", 24), ("accepted", 10), ("tok/round", 11), ("tok/s", 10), ("vs full", 9),
           ("vs transformers", 17), ("same tokens", 13)], rows)


if __name__ == "__main__":
    main()
