"""The repository passes ruff (configured in pyproject.toml: line length 120, pyflakes, isort, bugbear)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", REPO], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_console_scripts_are_installed_and_answer_help():
    bindir = os.path.dirname(sys.executable)
    for script in ("ouro-train", "ouro-generate", "ouro-export", "ouro-prepare", "ouro-eval"):
        proc = subprocess.run([os.path.join(bindir, script), "--help"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        output = proc.stdout + proc.stderr
        assert "usage" in output.lower() and "Traceback" not in output, (script, output)
        assert proc.returncode == (1 if script == "ouro-train" else 0), (script, output)  # absl's --help exits 1
