"""Iso-parameter and iso-FLOP on Mano (SPEC 7): k layers looped L/k times vs k x 1 vs L x 1.

    python -m experiments.iso_mano --out runs/experiments/iso     # --quick: a short smoke run

All three are trained with the "last_step" objective (CE of the last step, no exit gate) on the same
stream; each is evaluated by `ouro_jax.evaluation.evaluate_model` (held-out expressions of the hardest
length: per-step exact-match accuracy). Writes OUT/results.json and OUT/iso_mano.png.
"""

from __future__ import annotations

import os

import numpy as np

from experiments.common import count_params, experiment_args, mano_config, new_figure, train_run, write_json
from ouro_jax.evaluation import evaluate_model


def architectures(k: int, total: int) -> dict[str, tuple[int, int]]:
    """name -> (layers, loops): the looped model, its iso-parameter and its iso-FLOP dense baselines."""
    return {f"looped {k}x{total // k}": (k, total // k), f"iso-param {k}x1": (k, 1),
            f"iso-FLOP {total}x1": (total, 1)}


def main(argv=None) -> dict:
    def add(p):
        p.add_argument("--layers", type=int, default=1, help="k, layers of the looped model")
        p.add_argument("--total", type=int, default=4, help="L, layer applications of the looped and dense models")

    a, seeds = experiment_args(__doc__, argv, out="runs/experiments/iso", task="mano:max_len=2,modulus=5",
                               steps_help="training steps", quick_help="4 steps", add=add)
    result = {"task": a.task, "steps": a.steps, "objective": "last_step", "examples": a.examples, "runs": {}}
    archs = architectures(a.layers, a.total)
    for name, (layers, loops) in archs.items():
        result["runs"][name] = {"layers": layers, "loops": loops, "seeds": {}}
    for seed in seeds:  # seed by seed: a partial set already compares all three
        for name, (layers, loops) in archs.items():
            entry = result["runs"][name]
            workdir = os.path.join(a.out, f"{layers}x{loops}_seed{seed}")
            config = mano_config(a.task, layers=layers, loops=loops, steps=a.steps, seed=seed)
            params_dir, wall = train_run(config, workdir)
            ev = evaluate_model(params_dir, task=a.task, num_examples=a.examples, batch_size=128,
                                output_dir=os.path.join(workdir, "eval"), progress=False)
            entry["params"] = count_params(params_dir)
            entry["seeds"][seed] = {"step_accuracy": ev["task"]["step_accuracy"], "wall_s": round(wall, 1)}
            print(f"{name} seed {seed}: {ev['task']['step_accuracy']} ({wall:.0f}s)", flush=True)
    for entry in result["runs"].values():
        entry["mean_step_accuracy"] = np.mean([s["step_accuracy"] for s in entry["seeds"].values()], 0).tolist()
    write_json(os.path.join(a.out, "results.json"), result)
    plot(result, os.path.join(a.out, "iso_mano.png"))
    return result


def plot(result: dict, path: str) -> None:
    """Accuracy vs layer applications per token: the looped model read at each step, the dense models."""
    fig, ax = new_figure()
    for i, ((name, entry), marker) in enumerate(zip(result["runs"].items(), "osD")):
        x = entry["layers"] * np.arange(1, entry["loops"] + 1)
        for s in entry["seeds"].values():
            ax.plot(x, s["step_accuracy"], marker, alpha=0.35, color=f"C{i}")
        ax.plot(x, entry["mean_step_accuracy"], marker + "-", color=f"C{i}",
                label=f"{name} ({entry['params'] / 1e3:.0f}k params)")
    ax.set_xlabel("layer applications per token (FLOPs)")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_title(f"{result['task']}, last_step objective, {result['steps']} steps\n"
                 f"(lines: mean over seeds; faint: each seed)", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path)


if __name__ == "__main__":
    main()
