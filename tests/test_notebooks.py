"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient), on the golden checkpoint
(with a small char-level tokenizer) instead of a hub download; each plot must come out as a PNG."""

import os
import pathlib

import nbclient
import nbformat
import pytest
from helpers import golden_with_tokenizer

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
