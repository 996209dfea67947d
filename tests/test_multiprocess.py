"""Two training processes joined by `jax.distributed` (CPU, gloo, coordinator on 127.0.0.1), 2 devices
each: they train like one process on the same 4-device mesh fed the same global batches (equal up to
the summation order of the cross-process all-reduce), each reads its own shard of the data, a kill -9
of the pair resumes bit-exactly, and SIGTERM to one process makes both save the same step and exit."""

import functools
import json
import os
import signal
import socket
import subprocess
import time

import jax
import ml_collections
import numpy as np
import pytest
from helpers import FAST_COMPILE, PYTHON, REPO, subprocess_env

from ouro_jax import sharding as shd
from ouro_jax.cli.export import main as export_main
from ouro_jax.cli.generate import main as generate_main
from ouro_jax.data import make_batch_iterator
from ouro_jax.params_io import load_params
from ouro_jax.train.loop import make_sources
from ouro_jax.train.settings import RunSettings
from ouro_jax.train.step import as_model_batch, build_train_program

pytestmark = pytest.mark.subprocess

PROCESSES, STEPS = 2, 8
ARGS = ["--config", os.path.join(REPO, "configs", "tiny.py"), "--config.data.eval_examples=0",
        f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=4", "--config.train.log_every=3",
        "--config.train.keep_checkpoints=10", "--config.distributed=True"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Pair:
    """The training CLI in PROCESSES processes on one workdir; each process logs to its own file."""

    def __init__(self, workdir, *extra):
        port = _free_port()
        env = subprocess_env(devices=2)
        env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"  # never listen beyond localhost
        self.workdir, self.logs, self.procs = workdir, [], []
        for i in range(PROCESSES):
            log = f"{workdir}.process{i}.log"
            self.logs.append(log)
            with open(log, "a") as f:
                self.procs.append(subprocess.Popen(
                    [PYTHON, "-m", "ouro_jax.cli.train", *ARGS, "--workdir", str(workdir),
                     f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={PROCESSES}", f"--process_id={i}",
                     *extra], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))

    def output(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def wait(self, timeout=300.0) -> list[int]:
        try:
            return [p.wait(timeout=max(1.0, timeout)) for p in self.procs]
        finally:
            self.kill()

    def wait_for(self, predicate, timeout=240.0) -> None:
        """Polls `predicate` (every 10 ms) while both processes run."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.kill()
                raise AssertionError("the pair exited early or timed out:\n" +
                                     "\n".join(self.output(i)[-3000:] for i in range(PROCESSES)))
            time.sleep(0.01)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _train_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"kind": "train"' in line]


def _load_config(workdir) -> ml_collections.ConfigDict:
    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))


def _shard_iterators(config, model_cfg):
    """The data iterators of process 0 and 1 of PROCESSES, as the run builds them."""
    sources = make_sources(RunSettings.of(config).data, model_cfg)
    return [make_batch_iterator(sources, seq_len=config.data.seq_len, batch_size=config.data.batch_size // PROCESSES,
                                seed=config.data.seed, process_index=i, process_count=PROCESSES, prefetch=0)
            for i in range(PROCESSES)]


@functools.cache
def _reference(config_json: str):
    """One process, the same 4-device mesh, fed the global batches the pair assembles (process 0's rows
    first): (losses per step, final params, whether the two shards' first batches differ)."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    mesh = shd.make_mesh(dict(config.mesh), devices=jax.devices()[:4])
    program = build_train_program(config, mesh, FAST_COMPILE)
    shards = _shard_iterators(config, program.model_cfg)
    state, losses, disjoint = program.init(jax.random.key(int(config.seed))), [], None
    for _ in range(int(config.train.steps)):
        parts = [as_model_batch(next(it)) for it in shards]
        if disjoint is None:
            disjoint = not np.array_equal(parts[0]["input_ids"], parts[1]["input_ids"])
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, metrics = program.step(state, shd.global_batch(batch, mesh))
        losses.append(float(jax.device_get(metrics["loss"])))
    return losses, jax.tree.map(np.asarray, jax.device_get(state.params)), disjoint


def _losses(rows) -> list[float]:
    by_step = {r["step"]: r["loss"] for r in rows}
    assert sorted(by_step) == list(range(1, STEPS + 1))
    return [by_step[s] for s in range(1, STEPS + 1)]


def _params(workdir):
    return jax.device_get(load_params(os.path.join(workdir, "params"))[1])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The workdir of an uninterrupted pair run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    pair = _Pair(run)
    assert pair.wait() == [0, 0], pair.output(0) + pair.output(1)
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in pair.output(1)
    return run


def test_two_processes_train_like_one_then_export_and_generate_in_one(straight_run, tmp_path):
    run = straight_run
    config = _load_config(run)
    losses, params, disjoint = _reference(json.dumps(config.to_dict(), sort_keys=True))
    assert disjoint, "both processes would read the same rows; the comparison would not show the data split"
    # gloo sums the gradients across processes in another order than one process does: float32 rounding.
    np.testing.assert_allclose(_losses(_train_rows(run)), losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _params(run), params)
    # Each process saved its own data-iterator position (its shard) with the train state.
    for step in (4, 8):
        assert sorted(os.listdir(run / "checkpoints" / str(step) / "data")) == [
            "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    # The params the pair wrote load, export and generate in this one process.
    assert export_main([str(run / "params"), str(tmp_path / "hf")]) == 0
    result = generate_main(["--model", str(tmp_path / "hf"), "--prompt-ids", "1,5,9", "--max-new-tokens", "4",
                            "--no-stream"])
    assert result.tokens.shape == (1, 4) and int(result.lengths[0]) == 4


@pytest.mark.slow
def test_kill9_of_the_pair_then_resume_is_bit_exact(straight_run, tmp_path):
    run = tmp_path / "run"
    pair = _Pair(run)  # polled every 10 ms, the kill lands well before step 8 (steps take ~0.1-0.3 s here)
    pair.wait_for(lambda: os.path.isdir(run / "checkpoints" / "4"))
    for p in pair.procs:
        p.send_signal(signal.SIGKILL)
    assert pair.wait() == [-signal.SIGKILL] * PROCESSES
    rows_before = _train_rows(run)
    if os.path.exists(run / "params"):
        pytest.fail("the pair finished before the kill; nothing was tested")

    resumed = _Pair(run)
    assert resumed.wait() == [0, 0], resumed.output(0)
    out = resumed.output(0)
    assert "resumed from step" in out
    resumed_from = int(out.split("resumed from step ")[1].split()[0])
    assert 4 <= resumed_from < STEPS
    # Rows up to the checkpoint were written before the kill; the resumed run re-logs the later steps.
    rows = [r for r in rows_before if r["step"] <= resumed_from] + _train_rows(run)[len(rows_before):]
    assert _losses(rows) == _losses(_train_rows(straight_run))
    jax.tree.map(np.testing.assert_array_equal, _params(run), _params(straight_run))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    run, check_every = tmp_path / "run", 3
    pair = _Pair(run, "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
                 f"--config.train.stop_check_every={check_every}", "--config.train.log_every=1")
    pair.wait_for(lambda: os.path.exists(run / "metrics.jsonl") and len(_train_rows(run)) >= 2)
    pair.procs[1].send_signal(signal.SIGTERM)
    assert pair.wait() == [128 + signal.SIGTERM] * PROCESSES, pair.output(0) + pair.output(1)
    stopped = {int(pair.output(i).split("stopped by SIGTERM after step ")[1].split(";")[0]) for i in range(PROCESSES)}
    assert len(stopped) == 1, stopped
    step = stopped.pop()
    assert step % check_every == 0 and step >= 2
    assert sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()) == [step]
    assert [r["step"] for r in _train_rows(run)] == list(range(1, step + 1))

    resumed = _Pair(run, f"--config.train.steps={step + 2}", "--config.train.checkpoint_every=100000")
    assert resumed.wait() == [0, 0], resumed.output(0)
    assert f"resumed from step {step}" in resumed.output(0) and f"resumed from step {step}" in resumed.output(1)
    assert [r["step"] for r in _train_rows(run)][-2:] == [step + 1, step + 2]
