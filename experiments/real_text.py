"""Per-step perplexity on real text (SPEC 5, 7): Python's standard library source, looped 1x4 vs 1x1 vs 4x1.

    python -m experiments.real_text --out runs/experiments/text   # --quick: a short smoke run

The corpus exists offline on every machine: the `.py` files under `sysconfig.get_paths()["stdlib"]` of
the running Python, sorted, split by a keyed hash of each file's relative path (a tenth held out, whole
files), written as JSONL and prepared by `ouro_jax.data.prepare` (the library of `ouro-prepare`, byte
tokenizer). Every model trains with the Stage I objective (expected CE over exit steps + beta * entropy of
the exit distribution) on the training files and is scored on the held-out files: perplexity at every
recurrent step, the mean exit pdf of the learned gate, and the Q-exit perplexity-vs-compute sweep.
Writes OUT/results.json (corpus: files, bytes, Python version) and OUT/*/eval plots.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig

import numpy as np

from configs import demo
from experiments.common import count_params, experiment_args, train_run, write_json
from ouro_jax.data.prepare import prepare
from ouro_jax.evaluation.forward import StepForward
from ouro_jax.evaluation.runner import load_checkpoint
from ouro_jax.evaluation.sweep import ce_quality, sweep
from ouro_jax.evaluation.text import score_text, text_source
from ouro_jax.exit import exit_pdf
from ouro_jax.train.config import model_config, model_fields


def is_heldout_file(relative_path: str, fraction: float = 0.1) -> bool:
    digest = hashlib.blake2b(relative_path.encode(), digest_size=8, key=b"stdlib-heldout").digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


def stdlib_corpus(out: str, max_bytes: int) -> dict:
    """OUT/train.jsonl and OUT/heldout.jsonl from the standard library's .py files (training files up to
    `max_bytes`, held-out files up to a tenth of it); returns what was written."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, names in os.walk(root)
                   for f in names if f.endswith(".py") and "site-packages" not in d)
    os.makedirs(out, exist_ok=True)
    info = {"root": root, "python": sys.version.split()[0], "train_files": 0, "heldout_files": 0,
            "train_bytes": 0, "heldout_bytes": 0}
    budget = {"train": max_bytes, "heldout": max_bytes // 10}
    with open(os.path.join(out, "train.jsonl"), "w") as train, open(os.path.join(out, "heldout.jsonl"), "w") as held:
        for rel in files:
            split = "heldout" if is_heldout_file(rel) else "train"
            with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
                text = f.read()
            if not text.strip() or info[f"{split}_bytes"] + len(text) > budget[split]:
                continue
            (held if split == "heldout" else train).write(json.dumps({"text": text}) + "\n")
            info[f"{split}_files"] += 1
            info[f"{split}_bytes"] += len(text)
    return info


def text_config(shards: str, *, layers: int, loops: int, steps: int, seed: int, lr: float):
    """The demo model (d=64) on bytes: vocabulary 320, rows of 128 tokens, batches of 16, Stage I."""
    c = demo.get_config()
    c.seed = seed
    c.model = model_fields(model_config(c).replace(num_hidden_layers=layers, total_ut_steps=loops, vocab_size=320,
                                                   max_position_embeddings=128))
    c.data.update(sources=shards, seq_len=128, batch_size=16, eval_examples=0)
    c.optim.update(peak_lr=lr, init_lr=lr / 10, end_lr=lr / 10, warmup_steps=min(50, steps // 10),
                   decay_steps=min(600, max(1, steps // 4)))
    c.train.update(steps=steps, log_every=max(1, steps // 4), eval_every=0, checkpoint_every=steps,
                   keep_checkpoints=1, progress_bar=False)
    return c


def score(params_dir: str, heldout: str, max_tokens: int) -> dict:
    """Per-step perplexity, mean exit pdf and the Q-exit sweep on the held-out files."""
    _, cfg, params = load_checkpoint(params_dir)
    scores = score_text(StepForward(cfg), params, text_source(heldout, cfg.vocab_size, tokenizer="byte"),
                        seq_len=128, batch_size=16, max_tokens=max_tokens, progress=False)
    gates = scores.gate_logits["model"]
    curves = sweep(scores.gate_logits, ce_quality(scores.step_ce), metric="ce", num_layers=cfg.num_hidden_layers)
    q_exit = [{"q": p["setting"], "layer_applications": p["layer_applications"],
               "perplexity": float(np.exp(p["value"]))} for p in curves["curves"]["q_exit:model"]]
    return {**scores.summary(), "exit_pdf": np.asarray(exit_pdf(gates)).mean(axis=1).tolist(), "q_exit": q_exit}


def main(argv=None) -> dict:
    def add(p):
        p.add_argument("--max-bytes", type=int, default=4_000_000, help="training bytes of the corpus")
        p.add_argument("--eval-tokens", type=int, default=65536)
        p.add_argument("--lr", type=float, default=1e-3)

    a, seeds = experiment_args(__doc__, argv, out="runs/experiments/text", task="stdlib",
                               steps_help="training steps", quick_help="4 steps", add=add)
    if a.quick:
        a.max_bytes, a.eval_tokens = 200_000, 2048
    corpus = stdlib_corpus(os.path.join(a.out, "corpus"), a.max_bytes)
    shards = os.path.join(a.out, "shards")
    if not os.path.isdir(shards):
        prepare([os.path.join(a.out, "corpus", "train.jsonl")], shards, tokenizer="byte", text_split="file",
                progress=False)
    archs = {"looped 1x4": (1, 4), "iso-param 1x1": (1, 1), "iso-FLOP 4x1": (4, 1)}
    result = {"corpus": corpus, "steps": a.steps, "lr": a.lr, "seeds": seeds, "runs": {n: {} for n in archs}}
    for seed in seeds:
        for name, (layers, loops) in archs.items():
            workdir = os.path.join(a.out, f"{layers}x{loops}_seed{seed}")
            params_dir, wall = train_run(text_config(shards, layers=layers, loops=loops, steps=a.steps, seed=seed,
                                                     lr=a.lr), workdir)
            run = {**score(params_dir, os.path.join(a.out, "corpus", "heldout.jsonl"), a.eval_tokens),
                   "params": count_params(params_dir), "wall_s": round(wall, 1)}
            result["runs"][name][str(seed)] = run
            print(f"{name} seed {seed}: held-out perplexity by step {run['step_perplexity']} ({wall:.0f}s)",
                  flush=True)
            write_json(os.path.join(a.out, "results.json"), result)
    return result


if __name__ == "__main__":
    main()
