"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient), on the golden checkpoint
(with a small char-level tokenizer) instead of a hub download; each plot must come out as a PNG."""

import os
import pathlib
import re
import sys
import types

import nbclient
import nbformat
import pytest
from helpers import golden_with_tokenizer, subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PLOTS = {"quickstart.ipynb": 0, "evaluate.ipynb": 4}   # image/png outputs each notebook must produce


def test_every_notebook_is_covered():
    assert {p.name for p in NOTEBOOKS} == set(PLOTS)


@pytest.mark.subprocess
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(notebook, golden_dir, tmp_path, monkeypatch):
    model = golden_with_tokenizer(golden_dir, tmp_path / "model")
    monkeypatch.setenv("OURO_MODEL", str(model))   # the kernel inherits the environment
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", subprocess_env(devices=8)["XLA_FLAGS"])  # the test devices, fast compiles
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == PLOTS[notebook.name]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if notebook.name == "quickstart.ipynb":
        assert "mean depth" in text and "tokenizer.json" in text and "The capital of France is" in text
    else:
        assert "perplexity per step" in text and "q_exit:model" in text
        tokens = int(re.search(r"(\d+) held-out tokens", text).group(1))
        assert tokens >= 10_000  # the shipped held-out text (char-level tokenizer here; ~3K BPE tokens)
    assert "ouro_jax is installed" in text  # the install cell ran and found the package


def _install_cell() -> str:
    cells = {nbformat.read(p, as_version=4).cells[1].source for p in NOTEBOOKS}
    assert len(cells) == 1, "every notebook has the same install cell"
    return cells.pop()


def _namespace(**modules) -> dict:
    """The install cell's functions, with some of the modules they use replaced."""
    source = _install_cell().replace("print(install_ouro_jax(OURO_SOURCE))", "")
    ns: dict = {}
    exec(compile(source, "install_cell", "exec"), ns)
    ns.update(modules)
    return ns


def test_install_cell_detects_the_runtime(monkeypatch):
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    no_gpu = types.SimpleNamespace(which=lambda name: None)
    devices = lambda *found: types.SimpleNamespace(glob=lambda pattern: [f for f in found if f.startswith(
        pattern[:-1])])
    assert _namespace(shutil=types.SimpleNamespace(which=lambda n: "/usr/bin/nvidia-smi"))["runtime_extra"]() == "cuda"
    assert _namespace(shutil=no_gpu, glob=devices("/dev/vfio/0", "/dev/vfio/vfio"))["runtime_extra"]() == "tpu"  # v5e
    assert _namespace(shutil=no_gpu, glob=devices("/dev/accel0"))["runtime_extra"]() == "tpu"                   # v2-v4
    assert _namespace(shutil=no_gpu, glob=devices("/dev/vfio/vfio"))["runtime_extra"]() == ""                   # CPU
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v6e-1")
    assert _namespace(shutil=no_gpu, glob=devices())["runtime_extra"]() == "tpu"


def test_install_cell_fails_in_one_line_offline_and_installs_with_ranges(monkeypatch, tmp_path):
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OURO_SOURCE", raising=False)
    missing = types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: None),
                                    metadata=importlib.metadata)

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    ns = _namespace(importlib=missing, socket=types.SimpleNamespace(create_connection=offline))
    with pytest.raises(SystemExit, match="set OURO_SOURCE"):
        ns["install_ouro_jax"]("")
    with pytest.raises(SystemExit) as e:
        ns["install_ouro_jax"]("ouro_jax @ git+https://example.org/ouro_jax.git")
    assert "offline" in str(e.value) and "\n" not in str(e.value)

    calls = []
    online = types.SimpleNamespace(create_connection=lambda *a, **k: types.SimpleNamespace(close=lambda: None))
    pip = types.SimpleNamespace(run=lambda cmd, **kw: calls.append(cmd) or types.SimpleNamespace(returncode=0))
    versions = iter([{"jax": "0.5.2", "numpy": "2.0.2"}, {"jax": "0.10.2", "numpy": "2.0.2"}])
    ns = _namespace(importlib=missing, socket=online, subprocess=pip, glob=types.SimpleNamespace(glob=lambda p: []),
                    shutil=types.SimpleNamespace(which=lambda n: None), _versions=lambda: next(versions))
    monkeypatch.setitem(sys.modules, "jax", types.ModuleType("jax"))  # imported before the install
    said = ns["install_ouro_jax"]("ouro_jax @ git+https://example.org/ouro_jax.git")
    assert calls[0][-1] == "ouro_jax[eval] @ git+https://example.org/ouro_jax.git"     # no exact pins: the ranges
    assert "RESTART the runtime" in said and "jax" in said
