"""The repository passes ruff (configured in pyproject.toml: line length 120, pyflakes, isort, bugbear)."""

import os
import subprocess
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", REPO], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_console_scripts_are_installed_and_answer_help():
    bindir = os.path.dirname(sys.executable)
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {s.split(":")[0].rsplit(".", 1)[0] for s in scripts.values()} <= {"ouro_jax.cli"}  # one home for commands
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {script: subprocess.Popen([os.path.join(bindir, script), "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env) for script in scripts}
    for script, proc in procs.items():   # started together: each mostly waits on imports
        output, _ = proc.communicate(timeout=180)
        assert "usage" in output.lower() and "Traceback" not in output, (script, output)
        absl_help_status = 1 if script in ("ouro-train", "ouro-aot") else 0  # absl's --help exits 1
        assert proc.returncode == absl_help_status, (script, output)
