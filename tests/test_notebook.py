"""The examples/ notebook runs top to bottom on the built-in model (so it never rots)."""
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "tour_shapes.ipynb"


@pytest.mark.slow
def test_the_tour_notebook_runs(tmp_path, monkeypatch):
    # the kernel imports this checkout's textspan, installed or not
    root = str(NOTEBOOK.parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" or o.output_type == "execute_result"]
    assert sum("image/png" in o.get("data", {}) for o in images) >= 3  # the figures render
    assert (tmp_path / "tour" / "atlas" / "index.html").is_file()
