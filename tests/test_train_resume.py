"""Checkpoint / resume of the training CLI in real subprocesses: kill -9 and resume is bit-exact,
SIGTERM leaves a restorable checkpoint, broken step directories are skipped, bad flags fail clearly."""

import json
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PYTHON, REPO, subprocess_env

from ouro_jax.data import make_batch_iterator
from ouro_jax.params_io import load_params
from ouro_jax.train.checkpointer import TrainCheckpointer
from ouro_jax.train.config import model_config
from ouro_jax.train.loop import FAULT_KILL_ENV

pytestmark = pytest.mark.subprocess

ARGS = ["--config", os.path.join(REPO, "configs", "tiny.py"), "--config.data.batch_size=16",
        "--config.data.seq_len=32", "--config.data.eval_examples=0", "--config.train.checkpoint_every=5",
        "--config.train.keep_checkpoints=10"]


def _start(workdir, *extra, env=None):
    return subprocess.Popen([PYTHON, "-m", "ouro_jax.cli.train", *ARGS, "--workdir", str(workdir), *extra], cwd=REPO,
                            env={**subprocess_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _wait_for(predicate, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.01)


def _train_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"kind": "train"' in line]


def test_kill9_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc_straight = _start(straight)
    rc, out = _finish(_start(killed, env={FAULT_KILL_ENV: "13"}))  # SIGKILL itself after step 13
    assert rc == -signal.SIGKILL, out
    assert not os.path.exists(killed / "params")
    assert sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit()) == [5, 10]

    rc, out = _finish(_start(killed))
    assert rc == 0, out
    assert "resumed from step 10" in out and "params for inference" in out
    rc, out_straight = _finish(proc_straight)
    assert rc == 0, out_straight

    _, params_straight = load_params(straight / "params")
    _, params_resumed = load_params(killed / "params")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_straight), jax.device_get(params_resumed))

    lines = _train_lines(straight)
    assert [d["step"] for d in lines] == list(range(1, 21))
    for key in ("loss", "grad_norm", "learning_rate", "entropy", "tokens_per_s", "mfu", "step_ce/step_3",
                "exit_p/step_1", "beta", "nonfinite_total"):
        assert all(np.isfinite(d[key]) for d in lines), key
    assert lines[-1]["loss"] < lines[0]["loss"]
    resumed = _train_lines(killed)
    by_step = {d["step"]: d["loss"] for d in resumed}  # the resumed run re-logs the steps after its checkpoint
    assert all(by_step[d["step"]] == d["loss"] for d in lines)
    assert os.listdir(straight / "tb") and os.path.exists(straight / "config.json")


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
    proc = _start(tmp_path, "--config.train.steps=100000", "--config.train.checkpoint_every=100000")
    _wait_for(lambda: os.path.exists(tmp_path / "metrics.jsonl") and len(_train_lines(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM after step" in out
    stopped_at = int(out.split("stopped by SIGTERM after step ")[1].split(";")[0])
    checkpointer = TrainCheckpointer(tmp_path / "checkpoints", save_every=1)
    assert checkpointer.all_steps() == [stopped_at]
    state = checkpointer.restore_latest(_abstract_state(tmp_path))
    checkpointer.close()
    assert state is not None and state[0] == stopped_at and int(state[1].step) == stopped_at
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state[1].params)))


def _abstract_state(workdir):
    """The TrainState layout of the config a run saved in `workdir`."""
    import ml_collections

    from ouro_jax import sharding as shd
    from ouro_jax.train.step import build_train_program

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    program = build_train_program(config, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    return program.abstract_state


def test_broken_step_directories_are_skipped_with_a_message(tmp_path, capsys):
    data = make_batch_iterator("mano:max_len=3", seq_len=16, batch_size=4, seed=0, prefetch=0)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(5)}
    checkpointer = TrainCheckpointer(tmp_path, save_every=5)
    next(data), next(data)
    assert checkpointer.save(5, state, data)
    assert not checkpointer.save(6, state, data)  # not due
    checkpointer.wait()
    expected_next = next(data)
    checkpointer.close()
    os.makedirs(tmp_path / "9")  # a half-written or foreign directory named like a newer step
    (tmp_path / "9" / "junk").write_text("not a checkpoint")

    fresh = make_batch_iterator("mano:max_len=3", seq_len=16, batch_size=4, seed=0, prefetch=0)
    checkpointer = TrainCheckpointer(tmp_path, save_every=5)
    step, restored = checkpointer.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
                                                 fresh)
    checkpointer.close()
    assert step == 5 and "skipping step 9" in capsys.readouterr().out
    np.testing.assert_array_equal(restored["w"], state["w"])
    jax.tree.map(np.testing.assert_array_equal, next(fresh), expected_next)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    checkpointer = TrainCheckpointer(tmp_path, save_every=5, keep=2)
    for step in range(1, 21):
        checkpointer.save(step, {"w": jnp.full(3, float(step))})
    checkpointer.wait()
    assert checkpointer.all_steps() == [15, 20]
    step, restored = checkpointer.restore_latest({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    checkpointer.close()
    assert step == 20 and float(restored["w"][0]) == 20.0


def test_bad_command_lines_fail_clearly(tmp_path):
    for extra in (["--workdir", str(tmp_path), "--config.train.stepz=3"], []):
        proc = subprocess.run([PYTHON, "-m", "ouro_jax.cli.train", *ARGS, *extra], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        if extra:
            assert "'stepz'" in proc.stderr and 'Did you mean "steps"' in proc.stderr
        else:
            assert "--workdir" in proc.stderr


def test_consecutive_nonfinite_steps_stop_the_run_without_a_checkpoint(tmp_path):
    from helpers import FAST_COMPILE, tiny_train_config

    from ouro_jax.model import init_params
    from ouro_jax.params_io import save_params
    from ouro_jax.train import loop as train

    config = tiny_train_config()
    model_cfg = model_config(config)
    params = jax.tree.map(np.array, init_params(model_cfg, jax.random.key(0)))
    params["lm_head"][:, 0] = 3e38  # finite weights (NaN ones are refused on load) whose logits overflow
    save_params(tmp_path / "bad_params", model_cfg, params)
    config.init_from = str(tmp_path / "bad_params")
    config.train.update(max_consecutive_nonfinite=3, checkpoint_every=100, compiler_options=FAST_COMPILE)
    config.data.eval_examples = 0
    with pytest.raises(train.NonFiniteTrainingError, match="3 consecutive non-finite"):
        train.train(config, str(tmp_path / "run"))
    assert not [d for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit()]
    lines = _train_lines(tmp_path / "run")
    assert [d["nonfinite_streak"] for d in lines] == [1, 2, 3] and all(d["skipped"] == 1 for d in lines)
