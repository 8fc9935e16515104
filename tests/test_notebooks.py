"""Every notebook runs top to bottom in a fresh kernel, on its small settings, and is stored
with its outputs.

A notebook reads ``RBYZ_NOTEBOOK_QUICK=1`` (set here) to pick settings that run in the suite's
time; its ``assert`` cells check the claims it states in both modes. The stored outputs come from
the full settings (``jupyter execute --inplace notebooks/NAME.ipynb``), so that a reader sees the
figures before running anything.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _read(path):
    return nbformat.read(path, as_version=4)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("RBYZ_NOTEBOOK_QUICK", "1")
    # The kernel is a fresh process: it must not inherit the suite's simulated devices.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    notebook = _read(path)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_with_its_figures(path):
    notebook = _read(path)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    assert all(c.get("execution_count") for c in code), (
        f"{path.name} is stored without outputs for some cells: run "
        f"`jupyter execute --inplace notebooks/{path.name}` and commit the result.")
    images = [o for c in code for o in c.get("outputs", ())
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} draws no figure; a reader should see one before running it."
    errors = [o for c in code for o in c.get("outputs", ()) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} is stored with an error output"


def test_notebooks_exist():
    assert NOTEBOOKS, "notebooks/ holds no notebook"
