"""Restart-to-first-step time of a resumed run, with and without the persistent compilation cache (CPU).

    .venv/bin/python benchmarks/bench_restart.py [--config configs/demo.py] [--rounds 3]

Trains `--steps` steps into two workdirs (one with `train.compilation_cache_dir` at its default,
WORKDIR/compilation_cache, one with 'none'), then restarts each `--rounds` times, interleaved, for one
more step each time: the wall time of the resumed process (start, restore, compile or cache load, one
step, checkpoint, exit) and the compile time it reports. Prints both beside each other and their ratio.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(config: str, workdir: pathlib.Path, steps: int, cache: str) -> tuple[float, float]:
    """(wall seconds, reported compile seconds) of one training process."""
    args = [sys.executable, "-m", "ouro_jax.cli.train", "--config", config, "--workdir", str(workdir),
            f"--config.train.steps={steps}", "--config.data.eval_examples=0", "--config.train.export_params=False",
            f"--config.train.checkpoint_every={steps}", "--config.optim.decay=none", "--config.optim.warmup_steps=1",
            f"--config.train.compilation_cache_dir={cache}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    compiled = re.search(r"compiled in ([\d.]+)s", proc.stdout)
    return wall, float(compiled.group(1)) if compiled else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.py"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; config {args.config}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"cache": pathlib.Path(tmp) / "cached", "none": pathlib.Path(tmp) / "uncached"}
        for name, workdir in dirs.items():
            run(args.config, workdir, args.steps, "" if name == "cache" else "none")
        print(f"{'round':>5} {'no cache: wall s':>17} {'compile s':>10} {'cache: wall s':>14} {'compile s':>10} "
              f"{'wall ratio':>10}")
        steps = args.steps
        for r in range(args.rounds):
            steps += 1
            off = run(args.config, dirs["none"], steps, "none")
            on = run(args.config, dirs["cache"], steps, "")
            print(f"{r:>5} {off[0]:17.1f} {off[1]:10.2f} {on[0]:14.1f} {on[1]:10.2f} {off[0] / on[0]:10.2f}")


if __name__ == "__main__":
    main()
