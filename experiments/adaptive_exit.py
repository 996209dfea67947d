"""Adaptive computation (SPEC 4): a Stage I looped model, its Stage II gate, accuracy vs mean depth.

    python -m experiments.adaptive_exit --out runs/experiments/adaptive   # --quick: a short smoke run

Per seed: trains the Stage I model (1 layer x 4 loops, entropy-regularized objective), then the Stage II
gate on it (`configs/stage2_gate.py`: the LM frozen), and evaluates with `ouro_jax.evaluation.evaluate_model`:
static exit at every step, Q-exit with the Stage I gate and with the Stage II gate (`gate_from`). Writes
OUT/results.json (with each Q-exit point's gain over static exit at the same mean depth) and the
evaluation's sweep plot OUT/eval_seedS/sweep_task_mano.png.
"""

from __future__ import annotations

import os

import numpy as np

from configs import stage2_gate
from experiments.common import experiment_args, looped_stage1, train_run, write_json
from ouro_jax.evaluation import evaluate_model

TASK = "mano:max_len=2,modulus=5,answer_base=2"


def stage2_config(stage1_params: str, task: str, steps: int):
    """Stage II on the small model (every model field comes from `stage1_params`), the demo's batches, float32."""
    c = stage2_gate.get_config()
    c.init_from = stage1_params
    c.execution.update(dtype="float32", unroll=True)
    c.mesh.update(data=-1, fsdp=1)
    c.data.update(sources=task, seq_len=32, batch_size=32)
    c.optim.update(warmup_steps=min(100, steps // 4), decay_steps=max(1, steps // 2))
    c.train.update(steps=steps, ce_chunk_size=64, log_every=max(1, steps // 4), checkpoint_every=steps,
                   keep_checkpoints=1)
    return c


def gain_over_static(sweep: dict) -> dict:
    """Per Q-exit curve: accuracy minus static exit's, linearly interpolated at the same mean depth."""
    static = sweep["curves"]["static"]
    depth, acc = [p["mean_depth"] for p in static], [p["value"] for p in static]
    return {name: [round(p["value"] - float(np.interp(p["mean_depth"], depth, acc)), 4) for p in points]
            for name, points in sweep["curves"].items() if name != "static"}


def main(argv=None) -> dict:
    a, seeds = experiment_args(
        __doc__, argv, out="runs/experiments/adaptive", task=TASK, steps_help="Stage I steps", quick_help="4 + 4 steps",
        add=lambda p: p.add_argument("--gate-steps", type=int, default=600, help="Stage II steps"))
    if a.quick:
        a.gate_steps = 4
    result = {"task": a.task, "steps": a.steps, "gate_steps": a.gate_steps, "examples": a.examples, "seeds": {}}
    for seed in seeds:
        stage1, wall1 = looped_stage1(a.out, a.task, steps=a.steps, seed=seed)
        stage2_dir = os.path.join(a.out, f"stage2_seed{seed}")
        stage2, wall2 = train_run(stage2_config(stage1, a.task, a.gate_steps), stage2_dir)
        ev = evaluate_model(stage1, task=a.task, gate_from=stage2, num_examples=a.examples, batch_size=128,
                            output_dir=os.path.join(a.out, f"eval_seed{seed}"), progress=False)
        sweep = ev["task"]["sweep"]
        result["seeds"][seed] = {"step_accuracy": ev["task"]["step_accuracy"], "sweep": sweep,
                                 "gain_over_static": gain_over_static(sweep), "plot": ev["plots"]["task_mano"],
                                 "wall_s": {"stage1": round(wall1, 1), "stage2": round(wall2, 1)}}
        print(f"seed {seed}: static {ev['task']['step_accuracy']}, gains {gain_over_static(sweep)}", flush=True)
    write_json(os.path.join(a.out, "results.json"), result)
    return result


if __name__ == "__main__":
    main()
