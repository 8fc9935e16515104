"""Every notebook runs top to bottom (its code cells, in order, in one namespace)."""

import json
import pathlib

import jax
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    cells = json.loads(path.read_text())["cells"]
    namespace = {"__name__": "__main__"}
    # Notebooks are written for users' default numerics, not the suite's strict promotion.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for cell in cells:
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)


def test_notebooks_exist():
    assert NOTEBOOKS, "notebooks/ holds no notebook"
