"""Shared pieces of the experiment drivers: the small Mano config, training runs, parameter counts, JSON, figures."""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

from configs import demo
from ouro_jax.data import make_source
from ouro_jax.evaluation import evaluate_model
from ouro_jax.params_io import load_model
from ouro_jax.train.config import model_config, model_fields
from ouro_jax.train.loop import train


def experiment_args(doc: str, argv, *, out: str, task: str, steps_help: str, quick_help: str, add=None):
    """(args, seeds) of a driver: --out, --task, --steps, --seeds, --examples, --quick (4 steps, 16 examples,
    one seed) and whatever `add(parser)` adds."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default=out)
    p.add_argument("--task", default=task)
    p.add_argument("--steps", type=int, default=3000, help=steps_help)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--examples", type=int, default=512, help="held-out examples")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {quick_help}, 16 examples, one seed")
    if add:
        add(p)
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.quick:
        a.steps, a.examples, seeds = 4, 16, seeds[:1]
    return a, seeds


def mano_config(task: str, *, layers: int, loops: int, steps: int, seed: int, objective: str = "last_step",
                lr: float | None = None, hidden: int = 64):
    """The demo recipe (d=64, 32 x 32 tokens, AdamW 1e-3 or `lr`) with `layers` shared layers looped `loops` times
    (`hidden` != 64: width d, SwiGLU 2d, heads of 16); a task with longer examples or more tokens gets rows of 64
    tokens (half as many) and a larger vocabulary."""
    c = demo.get_config()
    c.seed = seed
    source = make_source(task)
    model = model_config(c).replace(num_hidden_layers=layers, total_ut_steps=loops,
                                    vocab_size=max(64, -(-source.vocab_size // 64) * 64), hidden_size=hidden,
                                    intermediate_size=2 * hidden, num_attention_heads=hidden // 16,
                                    num_key_value_heads=hidden // 16)
    c.model = model_fields(model)
    if source.max_example_len > c.data.seq_len:
        c.data.update(seq_len=64, batch_size=16)
    if lr is not None:
        c.optim.update(peak_lr=lr, init_lr=lr / 10, end_lr=lr / 10)
    c.data.sources = task
    c.data.eval_examples = 0  # evaluated afterwards with ouro_jax.evaluation
    c.loss.objective = objective
    c.optim.update(warmup_steps=min(50, steps // 10), decay_steps=min(600, max(1, steps // 4)))  # short runs
    c.train.update(steps=steps, log_every=max(1, steps // 4), eval_every=0, checkpoint_every=steps,
                   keep_checkpoints=1, progress_bar=False)
    return c


def train_run(config, workdir: str) -> tuple[str, float]:
    """Trains (or resumes) `config` in `workdir`; returns the params directory and the training wall time in
    seconds (kept in WORKDIR/wall_s.json: reloading a finished run reports the time it took to train)."""
    record = os.path.join(workdir, "wall_s.json")
    finished = os.path.isdir(os.path.join(workdir, "params")) and os.path.exists(record)
    start = time.perf_counter()
    result = train(config, workdir)
    if not finished:
        write_json(record, time.perf_counter() - start)
    with open(record) as f:
        return result.params_dir, json.load(f)


def train_and_evaluate(workdir: str, task: str, *, layers: int, loops: int, steps: int, seed: int, lr: float | None,
                       examples: int) -> dict:
    """Trains (or reloads) `mano_config(task, ...)` in `workdir` and evaluates it on the task's held-out
    examples: {"lr", "seed", "params", "step_accuracy", "wall_s"}."""
    config = mano_config(task, layers=layers, loops=loops, steps=steps, seed=seed, lr=lr)
    params_dir, wall = train_run(config, workdir)
    ev = evaluate_model(params_dir, task=task, num_examples=examples, batch_size=128,
                        output_dir=os.path.join(workdir, "eval"), progress=False)
    acc = ev["task"]["step_accuracy"]
    print(f"{workdir}: {acc} ({wall:.0f}s)", flush=True)
    return {"lr": config.optim.peak_lr, "seed": seed, "params": count_params(params_dir), "step_accuracy": acc,
            "wall_s": round(wall, 1)}


def looped_stage1(out: str, task: str, *, steps: int, seed: int, loops: int = 4) -> tuple[str, float]:
    """The Stage I looped model (1 layer x `loops`) of the adaptive-exit and KV-cache experiments, trained in
    OUT/stage1_seedS (a finished run is only reloaded); returns its params directory and the wall time."""
    config = mano_config(task, layers=1, loops=loops, steps=steps, seed=seed, objective="stage1")
    return train_run(config, os.path.join(out, f"stage1_seed{seed}"))


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def count_params(params_dir: str) -> int:
    return sum(x.size for x in jax.tree.leaves(load_model(params_dir)[1]))


def new_figure():
    """A standalone matplotlib figure (no GUI backend) with one grid axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="tight")
    ax = fig.add_subplot()
    ax.grid(alpha=0.3)
    return fig, ax
