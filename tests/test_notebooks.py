"""notebooks/quickstart.ipynb runs top to bottom (a 2-step training run in a temp dir) without a cell error."""

from __future__ import annotations

import os
import nbformat
from nbclient import NotebookClient

from conftest import REPO


def test_quickstart_notebook_runs(monkeypatch):
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("LENS_QUICKSTART_STEPS", "2")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # kernel python3: jupyter_client starts a kernel whose argv[0] is 'python' with sys.executable (the venv's)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()  # raises CellExecutionError on any cell error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)


def test_compute_budget_notebook_runs(monkeypatch):
    """notebooks/compute_budget.ipynb (analytic, no model built) runs top to bottom with inline figures."""
    nb = nbformat.read(REPO / "notebooks" / "compute_budget.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store the notebook without outputs"
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client = NotebookClient(nb, timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "0.193" in text and "0.611" in text and "implied MFU" in text
