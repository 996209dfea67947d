"""The repository passes ruff (configured in pyproject.toml: line length 120, pyflakes, isort, bugbear)."""

import importlib
import inspect
import os
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.subprocess
def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", REPO], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


ABSL_SCRIPTS = ("ouro-train", "ouro-aot")   # absl flags: --help exits 1


@pytest.mark.subprocess
def test_console_scripts_are_installed_and_answer_help(capsys):
    """Every script is installed; the absl ones and one argparse one answer --help as processes (the installed
    wrappers), the other argparse ones in-process (the same parser; no second interpreter start per script)."""
    bindir = os.path.dirname(sys.executable)
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {s.split(":")[0].rsplit(".", 1)[0] for s in scripts.values()} <= {"ouro_jax.cli"}  # one home for commands
    modules = {script: importlib.import_module(target.split(":")[0]) for script, target in scripts.items()}
    for script, module in modules.items():   # one convention: run() reads sys.argv, main(argv) is the in-process call
        assert scripts[script].endswith(":run") and not inspect.signature(module.run).parameters, script
        assert script in ABSL_SCRIPTS or "argv" in inspect.signature(module.main).parameters, script
    assert all(os.access(os.path.join(bindir, script), os.X_OK) for script in scripts)
    as_process = (*ABSL_SCRIPTS, "ouro-prepare")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {script: subprocess.Popen([os.path.join(bindir, script), "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env) for script in as_process}
    for script in set(scripts) - set(as_process):
        with pytest.raises(SystemExit) as exit_info:
            modules[script].main(["--help"])
        output = capsys.readouterr().out
        assert exit_info.value.code == 0 and output.startswith(f"usage: {script}"), (script, output)
    for script, proc in procs.items():   # started together: each mostly waits on imports
        output, _ = proc.communicate(timeout=180)
        assert "usage" in output.lower() and "Traceback" not in output, (script, output)
        assert proc.returncode == (1 if script in ABSL_SCRIPTS else 0), (script, output)
