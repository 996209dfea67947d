"""Knowledge capacity (SPEC 7, Capo): bits stored per parameter, looped vs non-looped at equal parameters.

    python -m experiments.capo_capacity --out runs/experiments/capo   # --quick: a short smoke run

Trains k layers x T loops and the same k layers x 1 (identical parameters) on every fact of a set of
synthetic biographies (`ouro_jax.data.capo.Capo`), then measures the knowledge each stores from its
cross-entropy on every fact: `Capo.capacity_bits` (the Physics of LMs 3.3 bound), per recurrent step, and
divides by the parameter count. The paper finds that looping does not add capacity: about equal bits
per parameter for both. Writes OUT/results.json.
"""

from __future__ import annotations

import os

import numpy as np

from experiments.common import count_params, experiment_args, mano_config, train_run, write_json
from ouro_jax.evaluation.forward import StepForward
from ouro_jax.evaluation.runner import load_checkpoint
from ouro_jax.evaluation.tasks import make_eval_task, score_task

BIOGRAPHIES = "capo:num_people=2000,num_attributes=4,values_per_attribute=32"


def stored_bits(params_dir: str, spec: str, batch_size: int = 256) -> dict:
    """Per recurrent step: the bits stored (from the mean CE on each attribute's value over all people)."""
    _, cfg, params = load_checkpoint(params_dir)
    task = make_eval_task(spec, cfg.vocab_size)
    scores = score_task(StepForward(cfg, predictions=True), params, task, num_examples=task.num_train_examples,
                        batch_size=batch_size, progress=False)
    attributes = np.array([task.attribute_of(p) for p in scores.prompts])
    losses = [[float(ce[attributes == a, 0].mean()) for a in range(task.num_attributes)] for ce in scores.step_ce]
    return {"bits": [task.capacity_bits(np.array(step)) for step in losses], "value_loss": losses,
            "step_accuracy": scores.step_accuracy(), "total_bits": task.total_bits}


def main(argv=None) -> dict:
    def add(p):
        p.add_argument("--layers", type=int, default=1)
        p.add_argument("--loops", type=int, default=4)
        p.add_argument("--lr", type=float, default=3e-3)
        p.add_argument("--hidden", type=int, default=64, help="model width d (SwiGLU 2d, heads of 16): a "
                       "narrower model holds fewer bits than the biographies, so it is measured at capacity")

    a, seeds = experiment_args(__doc__, argv, out="runs/experiments/capo", task=BIOGRAPHIES,
                               steps_help="training steps", quick_help="4 steps", add=add)
    if a.quick:
        a.task = a.task.replace("num_people=2000", "num_people=50")
    archs = {f"looped {a.layers}x{a.loops}": (a.layers, a.loops), f"non-looped {a.layers}x1": (a.layers, 1)}
    result = {"task": a.task, "steps": a.steps, "lr": a.lr, "hidden": a.hidden, "seeds": seeds,
              "runs": {name: {} for name in archs}}
    for seed in seeds:
        for name, (layers, loops) in archs.items():
            workdir = os.path.join(a.out, f"{layers}x{loops}_seed{seed}")
            config = mano_config(a.task, layers=layers, loops=loops, steps=a.steps, seed=seed, lr=a.lr,
                                 hidden=a.hidden)
            params_dir, wall = train_run(config, workdir)
            run = {**stored_bits(params_dir, a.task), "params": count_params(params_dir), "wall_s": round(wall, 1)}
            run["bits_per_param"] = [b / run["params"] for b in run["bits"]]
            result["runs"][name][str(seed)] = run
            print(f"{name} seed {seed}: {run['bits'][-1]:.0f} bits of {run['total_bits']:.0f}, "
                  f"{run['bits_per_param'][-1]:.3f} bits/param ({wall:.0f}s)", flush=True)
            write_json(os.path.join(a.out, "results.json"), result)
    return result


if __name__ == "__main__":
    main()
