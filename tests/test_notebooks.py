"""Every notebook in notebooks/ runs top to bottom in smoke mode (TLKIT_SMOKE=1), one fresh kernel each.

Smoke mode uses the built-in `shapes` dataset, a tiny `.keras` backbone with random weights and 32 px images,
so a notebook takes well under a minute on a CPU and downloads nothing. Any cell error fails the test.
"""
from __future__ import annotations

import glob
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
REQUIRED = ("01_quickstart.ipynb", "04_strategies_compared.ipynb")


def test_required_notebooks_exist():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    for name in REQUIRED:
        assert name in names, f"notebooks/{name} is missing (found: {names})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_committed_clean(path):
    """Outputs cleared, and the first code cell sets SMOKE from the TLKIT_SMOKE environment variable."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path} has no code cell"
    assert "SMOKE" in code[0].source and "TLKIT_SMOKE" in code[0].source, \
        f"the first code cell of {path} must set SMOKE from os.environ['TLKIT_SMOKE']"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path}: cells {dirty} have outputs; commit notebooks with outputs cleared"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("TLKIT_SMOKE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.time()
    client.execute()  # raises CellExecutionError naming the cell on any error
    seconds = time.time() - t0
    print(f"{os.path.basename(path)}: {seconds:.1f} s")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "not every code cell ran"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    images = [o for c in code for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert images, f"{path} drew no picture"
