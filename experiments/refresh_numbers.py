"""Regenerates the demo numbers of README.md from the current code, with the command, wall time and seed.

    python -m experiments.refresh_numbers --out runs/refresh          # --quick: a 4-step smoke run, docs untouched

Trains `configs/demo.py` exactly as `make demo` does, then a 600-step Stage II gate on it (the README's
`ouro-train --config configs/stage2_gate.py ...` command), evaluates both with `ouro_jax.evaluation.evaluate_model`
(512 held-out Mano expressions), and writes docs/numbers.json, the README's demo line and evaluation paragraph
(between `<!--numbers:NAME-->` markers) and docs/eval_demo_mano.png. The demo line is the line the demo prints;
`tests/test_experiments.py` checks the README against docs/numbers.json (fast) and against a fresh demo (slow).
The experiment sections of docs/results.md are written from each driver's results.json (`experiments/*.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time

from configs import demo
from experiments.adaptive_exit import stage2_config
from experiments.common import train_run, write_json
from ouro_jax.evaluation import evaluate_model
from ouro_jax.train.loop import report, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBERS = os.path.join(REPO, "docs", "numbers.json")
DEMO_COMMAND = "ouro-train --config configs/demo.py --workdir runs/demo"
STAGE2_COMMAND = ("ouro-train --config configs/stage2_gate.py --workdir runs/stage2 "
                  "--config.init_from=runs/demo/params --config.data.sources=mano:max_len=2,modulus=5 "
                  "--config.data.seq_len=32 --config.data.batch_size=32 "
                  "--config.train.steps=600 --config.execution.dtype=float32")


def accuracy_line(result) -> str:
    """The line of the demo's closing report with the held-out accuracy per recurrent step."""
    return next(line for line in report(result).splitlines() if "held-out accuracy" in line)


def run_demo(out: str, steps: int | None) -> dict:
    """Trains the demo config from scratch in OUT/demo; its printed accuracy line, seed and wall time."""
    workdir = os.path.join(out, "demo")
    shutil.rmtree(workdir, ignore_errors=True)  # OUT is this script's own directory: always a fresh run
    config = demo.get_config()
    if steps:
        config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, log_every=steps)
        config.optim.update(warmup_steps=1, decay_steps=1)
        config.data.eval_examples = 16
    start = time.perf_counter()
    result = train(config, workdir)
    wall = time.perf_counter() - start
    return {"command": DEMO_COMMAND, "seed": config.seed, "steps": config.train.steps, "wall_s": round(wall, 1),
            "line": accuracy_line(result), "accuracy": [round(a, 3) for a in result.eval_metrics["mano"]["accuracy"]],
            "params": result.params_dir}


def run_demo_eval(out: str, params: str, gate_steps: int, examples: int) -> dict:
    """The Stage II gate on the demo model and the evaluation of both gates: static and Q-exit points."""
    task = demo.get_config().data.sources
    stage2, wall = train_run(stage2_config(params, task, gate_steps), os.path.join(out, "stage2"))
    ev = evaluate_model(params, task=task, gate_from=stage2, num_examples=examples, batch_size=128,
                        output_dir=os.path.join(out, "eval"), progress=False)
    curves = ev["task"]["sweep"]["curves"]
    pick = {name: [{"q": p["setting"], "depth": round(p["mean_depth"], 2), "accuracy": round(p["value"], 3)}
                   for p in points] for name, points in curves.items() if name != "static"}
    return {"command": STAGE2_COMMAND, "stage2_wall_s": round(wall, 1), "examples": examples,
            "static": [round(a, 3) for a in ev["task"]["step_accuracy"]], "q_exit": pick,
            "plot": ev["plots"]["task_mano"]}


def eval_paragraph(ev: dict) -> str:
    """The README's sentence on the demo evaluation, from the measured points."""
    static = " / ".join(f"{a:.3f}" for a in ev["static"])

    def best(name):
        full = ev["static"][-1]
        points = [p for p in ev["q_exit"][name] if p["accuracy"] >= full - 0.005] or ev["q_exit"][name][-1:]
        p = min(points, key=lambda p: p["depth"])
        return f"{p['accuracy']:.3f} at q={p['q']:g} (mean depth {p['depth']:.2f})"

    return (f"{ev['examples']} held-out Mano examples: static exit {static} at t = 1..4; the cheapest Q-exit point "
            f"within 0.005 of full depth: Stage I gate {best('q_exit:model')}, Stage II gate "
            f"{best('q_exit:trained')}.")


def replace_marked(text: str, name: str, value: str) -> str:
    """`text` with the span between `<!--numbers:NAME-->` and `<!--/numbers-->` set to `value`."""
    pattern = re.compile(rf"(<!--numbers:{name}-->).*?(<!--/numbers-->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!--numbers:{name}--> ... <!--/numbers--> span")
    return pattern.sub(lambda m: m.group(1) + value + m.group(2), text, count=1)


def marked(text: str, name: str) -> str:
    """The span between `<!--numbers:NAME-->` and `<!--/numbers-->`."""
    m = re.search(rf"<!--numbers:{name}-->(.*?)<!--/numbers-->", text, re.S)
    if not m:
        raise ValueError(f"no <!--numbers:{name}--> ... <!--/numbers--> span")
    return m.group(1)


def write_docs(numbers: dict, plot: str | None) -> None:
    write_json(NUMBERS, numbers)
    readme = os.path.join(REPO, "README.md")
    with open(readme) as f:
        text = f.read()
    text = replace_marked(text, "demo", f"`{numbers['demo']['line']}`")
    text = replace_marked(text, "demo_eval", eval_paragraph(numbers["demo_eval"]))
    with open(readme, "w") as f:
        f.write(text)
    if plot:
        shutil.copyfile(plot, os.path.join(REPO, "docs", "eval_demo_mano.png"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/refresh")
    p.add_argument("--quick", action="store_true", help="4 demo steps, 4 gate steps, 16 examples; docs untouched")
    a = p.parse_args(argv)
    start = time.perf_counter()
    numbers = {"demo": run_demo(a.out, 4 if a.quick else None)}
    numbers["demo_eval"] = run_demo_eval(a.out, numbers["demo"]["params"], 4 if a.quick else 600,
                                         16 if a.quick else 512)
    plot = numbers["demo_eval"].pop("plot")
    for entry in numbers.values():
        entry.pop("params", None)
    numbers["total_wall_s"] = round(time.perf_counter() - start, 1)
    numbers["refreshed_by"] = "python -m experiments.refresh_numbers"
    if a.quick:
        write_json(os.path.join(a.out, "numbers.json"), numbers)
    else:
        write_docs(numbers, plot)
    print(json.dumps(numbers, indent=2))
    return numbers


if __name__ == "__main__":
    main()
