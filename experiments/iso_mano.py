"""Iso-parameter and iso-FLOP on Mano (SPEC 7): k layers looped L/k times vs k x 1 vs L x 1.

    python -m experiments.iso_mano --out runs/experiments/iso     # --quick: a short smoke run
    python -m experiments.iso_mano --task mano:max_len=10,modulus=23 --layers 2 --total 12 --lrs 3e-4,1e-3,3e-3
                                                                  # the paper's appendix setting (F_23, L = 10)

Every model is trained at every learning rate of `--lrs` and every seed; each model reports its best run
(the paper reports the best of its learning-rate runs), its best learning rate with the mean over seeds there,
and the mean over all its runs.

All three are trained with the "last_step" objective (CE of the last step, no exit gate) on the same
stream; each is evaluated by `ouro_jax.evaluation.evaluate_model` (held-out expressions of the hardest
length: per-step exact-match accuracy). Writes OUT/results.json and OUT/iso_mano.png.
"""

from __future__ import annotations

import os

import numpy as np

from experiments.common import experiment_args, new_figure, train_and_evaluate, write_json


def architectures(k: int, total: int) -> dict[str, tuple[int, int]]:
    """name -> (layers, loops): the looped model, its iso-parameter and its iso-FLOP dense baselines."""
    return {f"looped {k}x{total // k}": (k, total // k), f"iso-param {k}x1": (k, 1),
            f"iso-FLOP {total}x1": (total, 1)}


def main(argv=None) -> dict:
    def add(p):
        p.add_argument("--layers", type=int, default=1, help="k, layers of the looped model")
        p.add_argument("--total", type=int, default=4, help="L, layer applications of the looped and dense models")
        p.add_argument("--lrs", default="1e-3", help="peak learning rates swept for every model, comma-separated")

    a, seeds = experiment_args(__doc__, argv, out="runs/experiments/iso", task="mano:max_len=2,modulus=5",
                               steps_help="training steps", quick_help="4 steps", add=add)
    lrs = [float(x) for x in a.lrs.split(",")]
    result = {"task": a.task, "steps": a.steps, "objective": "last_step", "examples": a.examples, "lrs": lrs,
              "seeds": seeds, "runs": {}}
    archs = architectures(a.layers, a.total)
    for name, (layers, loops) in archs.items():
        result["runs"][name] = {"layers": layers, "loops": loops, "runs": {}}
    for seed in seeds:  # seed by seed: a partial set already compares all three
        for lr in lrs:
            for name, (layers, loops) in archs.items():
                workdir = os.path.join(a.out, f"{layers}x{loops}_lr{lr:g}_seed{seed}")
                result["runs"][name]["runs"][f"lr={lr:g},seed={seed}"] = train_and_evaluate(
                    workdir, a.task, layers=layers, loops=loops, steps=a.steps, seed=seed, lr=lr, examples=a.examples)
                write_json(os.path.join(a.out, "results.json"), summarize(result))
    summarize(result)
    write_json(os.path.join(a.out, "results.json"), result)
    plot(result, os.path.join(a.out, "iso_mano.png"))
    return result


def summarize(result: dict) -> dict:
    """Per model: the best run (the paper's best of its learning-rate runs); the best learning rate (the highest
    mean over seeds) and that mean; the mean over all runs."""
    for entry in result["runs"].values():
        runs = list(entry["runs"].values())
        if not runs:
            continue
        best = max(runs, key=lambda r: r["step_accuracy"][-1])
        by_lr = {f"{lr:g}": np.mean([r["step_accuracy"] for r in runs if r["lr"] == lr], 0).tolist()
                 for lr in dict.fromkeys(r["lr"] for r in runs)}
        best_lr = max(by_lr, key=lambda lr: by_lr[lr][-1])
        entry.update(params=runs[0]["params"], best_run=f"lr={best['lr']:g},seed={best['seed']}",
                     best_step_accuracy=best["step_accuracy"], lr_mean_step_accuracy=by_lr, best_lr=best_lr,
                     mean_step_accuracy=np.mean([r["step_accuracy"] for r in runs], 0).tolist())
    return result


def plot(result: dict, path: str) -> None:
    """Accuracy vs layer applications per token: the looped model read at each step, the dense models."""
    fig, ax = new_figure()
    for i, ((name, entry), marker) in enumerate(zip(result["runs"].items(), "osD")):
        x = entry["layers"] * np.arange(1, entry["loops"] + 1)
        for r in entry["runs"].values():
            ax.plot(x, r["step_accuracy"], marker, alpha=0.35, color=f"C{i}")
        ax.plot(x, entry["best_step_accuracy"], marker + "-", color=f"C{i}",
                label=f"{name} ({entry['params'] / 1e3:.0f}k params)")
    ax.set_xlabel("layer applications per token (FLOPs)")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_title(f"{result['task']}, last_step objective, {result['steps']} steps\n"
                 f"(lines: best run over learning rates and seeds; faint: each run)", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path)


if __name__ == "__main__":
    main()
