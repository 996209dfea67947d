"""Decode speed on this CPU: ouro_jax at full depth and with early exit, and PyTorch/transformers.

    .venv/bin/python benchmarks/bench_decode.py
    .venv/bin/python benchmarks/bench_decode.py --hidden 512 --layers 8 --new-tokens 256 --batch 4

One random small Ouro model (T = 4). Its exit gate bias is set so that Q-exit at q = 0.5 stops after
1-3 steps (a trained gate would decide by itself; a random one is near 0.5 everywhere). Decode
tokens/s = (G - 1) new tokens / (time for G tokens - time for 1 token), so prefill is excluded; each
time is the best of `--repeats` runs after a warm-up (compilation excluded). The same weights are
exported with `ouro_jax.hf.export` and decoded greedily by `AutoModelForCausalLM(trust_remote_code=True)`
(which computes every step, as the released code does), and its tokens are compared with ours.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ouro_jax import config, model  # noqa: E402
from ouro_jax.inference import generate  # noqa: E402


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
    t_full = best_time(lambda: run(new_tokens), repeats)
    t_first = best_time(lambda: run(1), repeats)
    return batch * (new_tokens - 1) / max(t_full - t_first, 1e-9)


def jax_rows(cfg, params, prompts, new_tokens, repeats, **kw):
    cache_length = None

    def run(n):
        nonlocal cache_length
        result = generate(cfg, params, prompts, max_new_tokens=n, cache_length=cache_length, **kw)
        cache_length = cache_length or result.cache_length
        return result

    cache_length = generate(cfg, params, prompts, max_new_tokens=new_tokens, **kw).cache_length
    rate = decode_rate(run, new_tokens, len(prompts), repeats)
    return rate, run(new_tokens)


def torch_rate(cfg, params, prompts, new_tokens, repeats):
    try:
        import torch
        from transformers import AutoModelForCausalLM

        from ouro_jax.hf.export import export_hf
    except ImportError as e:
        return None, f"PyTorch side skipped: {e}"
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(os.path.join(tmp, "ouro"), cfg, jax.device_get(params), dtype="float32")
        hf = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "ouro"), trust_remote_code=True,
                                                  dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=cfg.pad_token_id)

    rate = decode_rate(run, new_tokens, len(prompts), repeats)
    return rate, run(new_tokens)[:, ids.shape[1]:].numpy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threshold", type=float, default=0.5, help="Q-exit q of the early-exit run")
    p.add_argument("--gate-bias", type=float, default=-0.5, help="exit-gate bias of the random model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)

    heads = max(1, args.hidden // 64)
    cfg = config.tiny(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      head_dim=args.hidden // heads, max_position_embeddings=4096)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    params = {**params, "exit_gate": {**params["exit_gate"], "bias": params["exit_gate"]["bias"] + args.gate_bias}}
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    T, N = cfg.total_ut_steps, cfg.num_hidden_layers
    print(f"model: d={cfg.hidden_size}, N={N} layers x T={T} steps, vocab {cfg.vocab_size}, "
          f"{model.count_params(params) / 1e6:.1f}M params; batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, float32; {os.cpu_count()} CPU cores")

    full_rate, full = jax_rows(cfg, params, prompts, args.new_tokens, args.repeats)
    exit_rate, early = jax_rows(cfg, params, prompts, args.new_tokens, args.repeats, exit_threshold=args.threshold)
    decoded = args.batch * (args.new_tokens - 1)
    rows = [("ouro_jax, full depth (q = 1)", full_rate, full.mean_depth, full.decode_layer_applications),
            (f"ouro_jax, Q-exit q = {args.threshold}", exit_rate, early.mean_depth, early.decode_layer_applications)]
    note = None
    if not args.no_torch:
        rate, torch_tokens = torch_rate(cfg, params, prompts, args.new_tokens, args.repeats)
        if rate is None:
            note = torch_tokens
        else:
            rows.append(("PyTorch/transformers generate(), all steps", rate, float(T), None))
            same = np.array_equal(torch_tokens, full.tokens)
            note = f"PyTorch greedy tokens {'equal' if same else 'DIFFER from'} ouro_jax full-depth tokens"

    print(f"\n{'decoder':<46}{'decode tok/s':>14}{'mean depth':>12}{'layer apps / token':>20}")
    for name, rate, depth, apps in rows:
        per_token = f"{apps / (args.new_tokens - 1):.1f}" if apps is not None else f"{T * N} (all)"
        print(f"{name:<46}{rate:>14.1f}{depth:>12.2f}{per_token:>20}")
    print(f"\nearly exit: {exit_rate / full_rate:.2f}x the full-depth speed, "
          f"{early.decode_layer_applications}/{full.decode_layer_applications} layer applications "
          f"over {decoded} decoded tokens")
    if note:
        print(note)


if __name__ == "__main__":
    main()
