"""Host overhead of the training loop: wall time per step of the tiny config (a step of ~no compute),
one process or several on this machine (CPU, fake devices, gloo collectives).

    python benchmarks/bench_train_loop.py --devices 4                   # one process, 4 devices
    python benchmarks/bench_train_loop.py --devices 2 --num_processes 2  # two processes x 2 devices

Every process runs `ouro_jax.train.loop.train` on the same 4-device mesh; process 0 prints the mean wall
time per step (metrics.jsonl: tokens per step / tokens_per_s) after the first `--skip` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(args) -> None:
    import jax

    if args.num_processes > 1:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from absl import logging

    from configs.tiny import get_config
    from ouro_jax.train.loop import train

    logging.set_verbosity(logging.WARNING)
    config = get_config()
    config.data.eval_examples = 0
    config.train.update(steps=args.steps, checkpoint_every=10 * args.steps, export_params=False,
                        log_every=args.log_every)
    train(config, args.workdir)
    if jax.process_index() == 0:
        tokens = config.data.batch_size * config.data.seq_len
        with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        times = [tokens / r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] > args.skip]
        print(f"RESULT processes={args.num_processes} steps={len(times)} "
              f"mean_step_ms={1e3 * sum(times) / len(times):.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=4, help="fake CPU devices per process")
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip", type=int, default=20)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--process_id", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.process_id >= 0:
        return _worker(args)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices} --xla_backend_optimization_level=0")
    with tempfile.TemporaryDirectory() as workdir:
        common = [sys.executable, os.path.abspath(__file__), f"--steps={args.steps}", f"--skip={args.skip}",
                  f"--log_every={args.log_every}", f"--num_processes={args.num_processes}",
                  f"--coordinator=127.0.0.1:{_free_port()}", f"--workdir={workdir}"]
        procs = [subprocess.Popen([*common, f"--process_id={i}"], env=env, cwd=repo)
                 for i in range(args.num_processes)]
        codes = [p.wait() for p in procs]
    sys.exit(max(codes))


if __name__ == "__main__":
    main()
