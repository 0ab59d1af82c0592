"""Every notebook in notebooks/ runs top to bottom in smoke mode (TLKIT_SMOKE=1), each in a fresh kernel.

Smoke mode uses the built-in `shapes` dataset, a tiny `.keras` backbone with random weights and 32 px images,
so a notebook takes about a minute on a CPU and downloads nothing. Any cell error fails the notebook's test.
The notebooks run two at a time (separate kernel processes) to keep the suite's wall time down.
"""
from __future__ import annotations

import asyncio
import glob
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
IDS = [os.path.basename(p) for p in NOTEBOOKS]
REQUIRED = ("01_quickstart.ipynb", "02_hyperparameter_search.ipynb", "03_export_and_deploy.ipynb",
            "04_strategies_compared.ipynb")
PARALLEL = int(os.environ.get("TLKIT_NOTEBOOK_PARALLEL", "2"))


def test_required_notebooks_exist():
    for name in REQUIRED:
        assert name in IDS, f"notebooks/{name} is missing (found: {IDS})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
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


async def _execute_all(workdir) -> dict[str, tuple]:
    gate = asyncio.Semaphore(max(1, PARALLEL))

    async def run(path):
        nb = nbformat.read(path, as_version=4)
        cwd = workdir / os.path.basename(path).replace(".ipynb", "")
        cwd.mkdir()
        client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                                resources={"metadata": {"path": str(cwd)}})
        async with gate:
            t0 = time.time()
            try:
                await client.async_execute()  # raises CellExecutionError naming the cell on any error
                error = None
            except Exception as e:  # reported by the notebook's own test below
                error = e
            return os.path.basename(path), (nb, time.time() - t0, error)

    return dict(await asyncio.gather(*(run(p) for p in NOTEBOOKS)))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLKIT_SMOKE", "1")
        mp.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        return asyncio.run(_execute_all(tmp_path_factory.mktemp("notebooks")))


@pytest.mark.parametrize("name", IDS)
def test_notebook_runs_in_smoke_mode(executed, name):
    nb, seconds, error = executed[name]
    print(f"{name}: {seconds:.1f} s")
    if error is not None:
        pytest.fail(f"{name} failed in smoke mode after {seconds:.0f} s:\n{error}")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "not every code cell ran"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    images = [o for c in code for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert images, f"{name} drew no picture"
