"""Serving under load on this CPU: an HTTP load generator with concurrent streaming clients against
ouro-serve (continuous batching, per-row early exit), beside `generate()` on static batches of the
same prompts (and, with --torch, transformers `generate()` on our export).

    python benchmarks/bench_serve.py --params runs/demo/params --torch   # the trained demo model (make demo)
    python benchmarks/bench_serve.py                                     # a random model of demo size
    python benchmarks/bench_serve.py --hidden 512 --layers 4 --torch     # a random d=512 model

The server is `ouro-serve` in its own process (our HF export of the random model, byte tokenizer),
so the load generator's threads do not share its interpreter.

Each client sends `--requests` requests one after another (streamed over SSE, greedy, `--new-tokens`
tokens each, random prompts of `--prompt-len` tokens). Throughput = generated tokens / wall time
of the whole load; time to first token (TTFT) and per-token latency (the mean gap between a
request's streamed tokens) are given at p50 and p99. `generate()` runs the same prompts as static
batches of the client count (prefill included, compilation excluded). Layer applications per token
come from the server's counters: per-row exit (compacted live rows) against the batch-level exit
that `generate` does (a batch steps until its deepest row exits). Every served greedy request's
tokens (`ouro.token_ids`) are compared with `generate`'s for the same prompt; with --torch, transformers
`generate()` runs the same prompts as static batches of the client count at full depth.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import requests  # noqa: E402
from bench_decode import TorchDecoder, load, table  # noqa: E402

from ouro_jax.hf.export import export_hf  # noqa: E402
from ouro_jax.inference import generate  # noqa: E402


def stream_one(url: str, prompt: list[int], new_tokens: int, q: float) -> tuple[float, list[float], list[int]]:
    """(time to first token, the gaps between the tokens after it, the token ids) of one streamed request."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "exit_threshold": q, "logprobs": 0}
    start, times, ids = time.perf_counter(), [], []
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            chunk = json.loads(line[6:])["choices"][0] if line.startswith(b"data: {") else None
            if chunk and chunk["ouro"]["token_ids"]:
                times.append(time.perf_counter())
                ids += chunk["ouro"]["token_ids"]
    return times[0] - start, [b - a for a, b in zip(times, times[1:])], ids


def load_test(url: str, prompts: list[list[int]], clients: int, new_tokens: int, q: float) -> dict:
    """`clients` threads, each sending its share of `prompts` one after another -> rates, latencies and
    the token ids of each prompt (in the order of `prompts`)."""
    per_client = [list(range(c, len(prompts), clients)) for c in range(clients)]

    def client(mine):
        return [(i, stream_one(url, prompts[i], new_tokens, q)) for i in mine]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = dict(r for rs in pool.map(client, per_client) for r in rs)
    wall = time.perf_counter() - start
    ttft = [r[0] for r in results.values()]
    gaps = [np.mean(r[1]) for r in results.values() if r[1]]
    return {"tok/s": sum(len(r[2]) for r in results.values()) / wall, "ttft50": 1e3 * np.percentile(ttft, 50),
            "ttft99": 1e3 * np.percentile(ttft, 99), "tpot50": 1e3 * np.percentile(gaps, 50),
            "tpot99": 1e3 * np.percentile(gaps, 99), "tokens": [results[i][2] for i in range(len(prompts))]}


def static_rate(cfg, params, prompts, batch: int, new_tokens: int, q: float) -> tuple[float, float, list]:
    """(tokens/s of generate() on static batches of `batch`, its layer applications per decode token,
    the token ids of each prompt it ran)."""
    run = lambda rows: generate(cfg, params, rows, max_new_tokens=new_tokens, exit_threshold=q)  # one shape
    batches = [prompts[i:i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
    run(batches[0])                                          # compiles
    start = time.perf_counter()
    results = [run(rows) for rows in batches]
    seconds = time.perf_counter() - start
    work = sum(r.decode_layer_applications for r in results)
    tokens = [row for r in results for row in r.rows()]
    return batch * len(batches) * new_tokens / seconds, work / (len(batches) * (new_tokens - 1)), tokens


def torch_rate(torch, prompts, batch: int, new_tokens: int) -> tuple[float, list]:
    """(tokens/s of transformers generate() on static batches of `batch` (prefill included), the ids)."""
    batches = [prompts[i:i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
    torch.generate(batches[0], 2)                            # warm-up
    start = time.perf_counter()
    tokens = [row.tolist() for rows in batches for row in torch.generate(rows, new_tokens)]
    return batch * len(batches) * new_tokens / (time.perf_counter() - start), tokens


def counters(url: str) -> dict[str, int]:
    return requests.get(url + "/health", timeout=60).json()["counters"]


def work_since(url: str, before: dict[str, int], layers: int) -> tuple[float, float]:
    """Layer applications per decode token since `before`: (per-row exit, batch-level exit)."""
    now = counters(url)
    tokens, row_steps, batch_steps = (now[k] - before[k] for k in ("decode_tokens", "row_steps", "batch_steps"))
    return layers * row_steps / max(tokens, 1), layers * batch_steps / max(tokens, 1)


def start_server(cfg, params, tmp: str, slots: int, max_len: int, queue: int) -> tuple[subprocess.Popen, str]:
    """`ouro-serve` on our HF export of the weights, in its own process; (process, url) once it answers."""
    export_hf(os.path.join(tmp, "model"), cfg, params, dtype="float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ouro_jax.cli.serve", "--model", os.path.join(tmp, "model"),
                             "--tokenizer", "byte", "--port", str(port), "--slots", str(slots), "--max-len",
                             str(max_len), "--prefill-chunk", "32", "--max-queue", str(queue)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            requests.get(url + "/health", timeout=5)
            return proc, url
        except requests.ConnectionError:
            if proc.poll() is not None:
                raise SystemExit("ouro-serve did not start") from None
            time.sleep(0.5)
    raise SystemExit("ouro-serve did not answer in 10 minutes")


def level(url, cfg, params, prompts, clients: int, new_tokens: int, q: float, torch) -> tuple:
    """One row of the table: the load of `clients` clients against the server, generate() and transformers
    on static batches of the client count, and how many served requests' tokens equal generate's."""
    before = counters(url)
    served = load_test(url, prompts, clients, new_tokens, q)
    per_row, batch_exit = work_since(url, before, cfg.num_hidden_layers)
    static, static_work, want = static_rate(cfg, params, prompts, clients, new_tokens, q)
    same = sum(got == ours for got, ours in zip(served["tokens"], want))
    theirs, torch_same = float("nan"), "-"
    if torch is not None and q == 1.0:
        theirs, torch_tokens = torch_rate(torch, prompts, clients, new_tokens)
        torch_same = f"{sum(a == b for a, b in zip(torch_tokens, want))}/{len(torch_tokens)}"
    return (str(clients), served["tok/s"], static, served["tok/s"] / static, theirs, served["ttft50"],
            served["ttft99"], served["tpot50"], served["tpot99"], per_row, batch_exit, static_work,
            f"{same}/{len(want)}", torch_same)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", help="a trained params checkpoint (default: a random model)")
    p.add_argument("--task", default="mano:max_len=2,modulus=5", help="prompt source for --params")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=32, help="requests per load level (spread over the clients)")
    p.add_argument("--thresholds", default="1.0,0.5", help="Q-exit q of the requests (1 = full depth)")
    p.add_argument("--gate-bias", type=float, default=-0.5, help="exit-gate bias of the random model")
    p.add_argument("--gate-scale", type=float, default=30.0,
                   help="exit-gate weights x this, so that tokens of the random model exit at different steps")
    p.add_argument("--torch", action="store_true", help="also transformers generate() on our export")
    args = p.parse_args(argv)
    cfg, params, prompts_of, source = load(args)
    if not args.params:
        gate = params["exit_gate"]
        params = {**params, "exit_gate": {**gate, "kernel": gate["kernel"] * args.gate_scale}}
    levels = [int(c) for c in args.clients.split(",")]
    prompts = prompts_of(max(args.requests, max(levels)))
    N, T, G = cfg.num_hidden_layers, cfg.total_ut_steps, args.new_tokens
    print(f"model: {source} d={cfg.hidden_size}, N={N} x T={T}, vocab {cfg.vocab_size}; prompt {args.prompt_len}, "
          f"{G} new tokens, greedy, float32; {len(prompts)} requests per level; {os.cpu_count()} CPU cores")
    torch = TorchDecoder(cfg, params) if args.torch else None
    tmp = tempfile.TemporaryDirectory()
    proc, url = start_server(cfg, params, tmp.name, max(levels), args.prompt_len + G + 1, len(prompts))
    try:
        for q in map(float, args.thresholds.split(",")):
            stream_one(url, prompts[0], G, q)                # warm-up
            rows = [level(url, cfg, params, prompts, clients, G, q, torch) for clients in levels]
            print(f"\n== q = {q}: ouro-serve over HTTP vs generate() static batches (and transformers)", flush=True)
            table([("clients", 8), ("serve tok/s", 13), ("generate", 10), ("ratio", 7), ("transformers", 14),
                   ("TTFT p50 ms", 13), ("p99", 8), ("tok ms p50", 12), ("p99", 8), ("layers/tok", 12),
                   ("batch-exit", 12), ("generate", 10), ("=generate", 11), ("torch=gen", 11)], rows)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        tmp.cleanup()


if __name__ == "__main__":
    main()
