"""Multi-hop QA sample efficiency (SPEC 7): held-out accuracy vs the fraction of 3-hop questions trained on.

    python -m experiments.multihop_efficiency --out runs/experiments/multihop   # --quick: a short smoke run

Every model sees all atomic facts of the graph and a fraction F of the 3-hop questions that are not held
out; it is scored on held-out 3-hop questions only (`MultiHopQA(num_heldout=...)`: never trained on,
asserted in tests/test_tasks.py). The looped model (k layers x T loops) against its iso-parameter baseline
(k layers x 1) at every F: the paper finds the looped model needs fewer questions to learn composition.
Writes OUT/results.json and OUT/multihop_efficiency.png.
"""

from __future__ import annotations

import os

import numpy as np

from experiments.common import experiment_args, new_figure, train_and_evaluate, write_json

GRAPH = "multihop_qa:hops=3,num_layers=4,entities_per_layer=30,num_relations=6,start_layers=1,num_heldout=500"


def main(argv=None) -> dict:
    def add(p):
        p.add_argument("--fractions", default="0.1,0.3,0.6", help="fractions of the 3-hop questions trained on")
        p.add_argument("--layers", type=int, default=1)
        p.add_argument("--loops", type=int, default=4)
        p.add_argument("--lr", type=float, default=1e-3)

    a, seeds = experiment_args(__doc__, argv, out="runs/experiments/multihop", task=GRAPH,
                               steps_help="training steps", quick_help="4 steps", add=add)
    fractions = [float(f) for f in a.fractions.split(",")]
    archs = {f"looped {a.layers}x{a.loops}": (a.layers, a.loops), f"iso-param {a.layers}x1": (a.layers, 1)}
    result = {"task": a.task, "steps": a.steps, "lr": a.lr, "examples": a.examples, "fractions": fractions,
              "seeds": seeds, "runs": {name: {} for name in archs}}
    for seed in seeds:
        for fraction in fractions:
            task = f"{a.task},train_fraction={fraction}"
            for name, (layers, loops) in archs.items():
                workdir = os.path.join(a.out, f"{layers}x{loops}_f{fraction:g}_seed{seed}")
                run = train_and_evaluate(workdir, task, layers=layers, loops=loops, steps=a.steps, seed=seed,
                                         lr=a.lr, examples=a.examples)
                result["runs"][name].setdefault(f"{fraction:g}", {})[str(seed)] = run
                write_json(os.path.join(a.out, "results.json"), result)
    result["final_accuracy"] = {name: {f: float(np.mean([r["step_accuracy"][-1] for r in by_seed.values()]))
                                       for f, by_seed in runs.items()} for name, runs in result["runs"].items()}
    write_json(os.path.join(a.out, "results.json"), result)
    plot(result, os.path.join(a.out, "multihop_efficiency.png"))
    return result


def plot(result: dict, path: str) -> None:
    fig, ax = new_figure()
    for i, (name, by_fraction) in enumerate(result["final_accuracy"].items()):
        xs = sorted(by_fraction, key=float)
        ax.plot([float(x) for x in xs], [by_fraction[x] for x in xs], "o-", color=f"C{i}", label=name)
    ax.set_xlabel("fraction of 3-hop questions trained on")
    ax.set_ylabel("held-out 3-hop exact-match accuracy")
    ax.set_title(f"{result['task']}\n{result['steps']} steps, lr {result['lr']:g}, mean over seeds", fontsize=8)
    ax.legend(fontsize=8)
    fig.savefig(path)


if __name__ == "__main__":
    main()
