"""Markdown tables of docs/results.md, rendered from each driver's results.json (no number is typed by hand).

    python -m experiments.results_tables runs/experiments      # rewrites the marked tables of docs/results.md

Each table sits between `<!--numbers:NAME-->` and `<!--/numbers-->` in docs/results.md; NAME is a driver's
table (iso_mano, iso_mano_f5, multihop_efficiency, multihop_efficiency_lr3e3, capo_capacity, real_text). Its
RUNS/<directory>/results.json (`SOURCES`) is copied to docs/results/NAME.json, and the table is rendered from
that copy; a test re-renders every table from the copies and compares. A driver without results leaves its
table as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from experiments import iso_mano as iso_mano_driver
from experiments.refresh_numbers import REPO, replace_marked

RESULTS_DIR = os.path.join(REPO, "docs", "results")
SOURCES = {"iso_mano": "iso_f23", "iso_mano_f5": "iso_f5", "multihop_efficiency": "multihop",
           "multihop_efficiency_lr3e3": "multihop_lr3e-3", "capo_capacity": "capo", "real_text": "text"}


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _steps(values, fmt="{:.3f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


def iso_mano(r: dict) -> str:
    r = iso_mano_driver.summarize(r)
    lines = [f"Task `{r['task']}`, {r['steps']} steps, learning rates {r['lrs']}, seeds {r['seeds']}, "
             f"{r['examples']} held-out expressions; accuracy read after each loop (t = 1..T). Per model: the best "
             "run / the mean over seeds at the best learning rate / the mean over all runs (final step).", "",
             _row(["model", "params", "run", "accuracy by step", "train wall"]), _row(["---"] * 5)]
    for name, e in r["runs"].items():
        for key, run in e["runs"].items():
            lines.append(_row([name, f"{run['params']:,}", key, _steps(run["step_accuracy"]),
                               f"{run['wall_s']:.0f} s"]))
        at_best_lr = e["lr_mean_step_accuracy"][e["best_lr"]][-1]
        lines.append(_row([f"**{name}**", "", f"best ({e['best_run']}) / mean at lr={e['best_lr']} / mean",
                           f"**{e['best_step_accuracy'][-1]:.3f}** / {at_best_lr:.3f} / "
                           f"{e['mean_step_accuracy'][-1]:.3f}", ""]))
    return "\n".join(lines)


def multihop_efficiency(r: dict) -> str:
    fractions = [f"{f:g}" for f in r["fractions"]]
    lines = [f"Task `{r['task']}`, {r['steps']} steps, lr {r['lr']:g}, seeds {r['seeds']}, {r['examples']} held-out "
             "3-hop questions; final-step accuracy (mean over seeds) by fraction of 3-hop questions trained on.", "",
             _row(["model"] + [f"F = {f}" for f in fractions]), _row(["---"] * (len(fractions) + 1))]
    for name, by_fraction in r.get("final_accuracy", {}).items():
        lines.append(_row([name] + [f"{by_fraction[f]:.3f}" if f in by_fraction else "" for f in fractions]))
    walls = [run["wall_s"] for runs in r["runs"].values() for seeds in runs.values() for run in seeds.values()]
    lines += ["", f"Training wall time: {sum(walls):.0f} s over {len(walls)} runs."]
    return "\n".join(lines)


def capo_capacity(r: dict) -> str:
    lines = [f"Task `{r['task']}`, d = {r.get('hidden', 64)}, {r['steps']} steps, lr {r['lr']:g}, "
             f"seeds {r['seeds']}.", "",
             _row(["model", "seed", "params", "stored bits by step (of total)", "bits / param (final)",
                   "accuracy by step", "train wall"]), _row(["---"] * 7)]
    for name, seeds in r["runs"].items():
        for seed, run in seeds.items():
            lines.append(_row([name, seed, f"{run['params']:,}",
                               f"{_steps(run['bits'], '{:.0f}')} (of {run['total_bits']:.0f})",
                               f"{run['bits_per_param'][-1]:.4f}", _steps(run["step_accuracy"]),
                               f"{run['wall_s']:.0f} s"]))
    return "\n".join(lines)


def real_text(r: dict) -> str:
    c = r["corpus"]
    lines = [f"Corpus: the `.py` files of Python {c['python']}'s standard library ({c['root']}): "
             f"{c['train_files']} training files ({c['train_bytes']:,} bytes), {c['heldout_files']} held-out files "
             f"({c['heldout_bytes']:,} bytes); byte tokenizer; {r['steps']} steps, lr {r['lr']:g}, seeds {r['seeds']}.",
             "", _row(["model", "seed", "params", "held-out perplexity by step", "mean exit pdf", "train wall"]),
             _row(["---"] * 6)]
    for name, seeds in r["runs"].items():
        for seed, run in seeds.items():
            lines.append(_row([name, seed, f"{run['params']:,}", _steps(run["step_perplexity"], "{:.2f}"),
                               _steps(run["exit_pdf"], "{:.2f}"), f"{run['wall_s']:.0f} s"]))
    looped = next((seeds for name, seeds in r["runs"].items() if name.startswith("looped")), {})
    for seed, run in looped.items():
        points = ", ".join(f"q={p['q']:g}: {p['layer_applications']:.2f} / {p['perplexity']:.2f}"
                           for p in run["q_exit"])
        lines += ["", f"Q-exit of the looped model, seed {seed} (layer applications per token / perplexity): {points}."]
    return "\n".join(lines)


RENDERERS = {"iso_mano": iso_mano, "iso_mano_f5": iso_mano, "multihop_efficiency": multihop_efficiency,
             "multihop_efficiency_lr3e3": multihop_efficiency, "capo_capacity": capo_capacity, "real_text": real_text}


def render_docs(text: str) -> tuple[str, list[str]]:
    """`text` (docs/results.md) with every table whose docs/results/NAME.json exists rendered from it."""
    written = []
    for name in SOURCES:
        saved = os.path.join(RESULTS_DIR, f"{name}.json")
        if os.path.exists(saved):
            with open(saved) as f:
                text = replace_marked(text, name, "\n" + RENDERERS[name](json.load(f)) + "\n")
            written.append(name)
    return text, written


def main(argv=None) -> list[str]:
    runs = (argv if argv is not None else sys.argv[1:] or ["runs/experiments"])[0]
    os.makedirs(RESULTS_DIR, exist_ok=True)
    for name, directory in SOURCES.items():
        results = os.path.join(runs, directory, "results.json")
        if os.path.exists(results):
            shutil.copyfile(results, os.path.join(RESULTS_DIR, f"{name}.json"))
    path = os.path.join(REPO, "docs", "results.md")
    with open(path) as f:
        text, written = render_docs(f.read())
    with open(path, "w") as f:
        f.write(text)
    print(f"docs/results.md: tables {written}")
    return written


if __name__ == "__main__":
    main()
