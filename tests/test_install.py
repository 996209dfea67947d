"""The install scheme: compatible ranges for users (requirements.txt, pyproject extras), the exact versions CI
tests in constraints.txt, every extra documented, and a runtime-only install that degrades gracefully."""

import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
from helpers import subprocess_env
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_TOOLS = {"nbclient", "nbformat", "ipykernel", "pytest", "pytest-xdist", "ruff", "accelerate"}


def _requirements(lines):
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def _pins() -> dict[str, Version]:
    pins = {}
    for req in _requirements((REPO / "constraints.txt").read_text().splitlines()):
        (spec,) = req.specifier
        assert spec.operator == "==", f"constraints.txt pins exact versions, not {req}"
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _extras() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {name: [Requirement(r) for r in reqs if not r.startswith("ouro_jax[")]
            for name, reqs in project["optional-dependencies"].items()}


def test_the_lock_satisfies_every_range():
    """`pip install -c constraints.txt -e .[dev]` resolves: every range admits its pinned version."""
    pins = _pins()
    runtime = _requirements((REPO / "requirements.txt").read_text().splitlines())
    for req in runtime + [r for reqs in _extras().values() for r in reqs]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} excludes the pinned {pins[name]}"
    for req in runtime:  # users get ranges: a runtime dependency is never pinned to one version
        assert not any(s.operator == "==" for s in req.specifier), f"requirements.txt pins {req} exactly"


def test_user_extras_are_documented_and_test_tools_are_dev_only():
    extras = _extras()
    readme = (REPO / "README.md").read_text()
    for name in extras:
        assert re.search(rf"`(ouro_jax)?\[{name}\]`", readme), f"README does not say what the `{name}` extra gives"
    for name, reqs in extras.items():
        if name != "dev":
            assert not TEST_TOOLS & {canonicalize_name(r.name) for r in reqs}, f"test tools in the `{name}` extra"


@pytest.mark.subprocess
def test_ouro_eval_without_matplotlib_writes_results_and_names_the_extra(tmp_path):
    """A runtime-only install (`pip install -e .`, what `make demo` builds) has no matplotlib: the README's first
    eval command still writes results.json and says the plots need the `eval` extra."""
    import jax

    from ouro_jax import config as presets
    from ouro_jax.model import init_params
    from ouro_jax.params_io import save_params

    cfg = presets.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=2, total_ut_steps=2)
    save_params(tmp_path / "params", cfg, init_params(cfg, jax.random.key(0)))
    script = ("import sys; sys.modules['matplotlib'] = None\n"  # as if matplotlib were not installed
              "from ouro_jax.cli.eval import run; run()")
    argv = [str(tmp_path / "params"), "--task", "mano:max_len=2,modulus=5", "--num-examples", "16",
            "--output", str(tmp_path / "eval_out"), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(devices=8))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pip install 'ouro_jax[eval]'" in proc.stderr and "step 1: accuracy" in proc.stdout
    results = (tmp_path / "eval_out" / "results.json").read_text()
    assert '"plots": {}' in results and "plots_skipped" in results
    assert not list((tmp_path / "eval_out").glob("*.png"))
