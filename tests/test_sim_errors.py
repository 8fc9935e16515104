"""The aggregation-error table runs, covers every attack, and the robust rules stay finite."""

import math

import jax
import pytest

from rbyz import aggregators
from rbyz.sim import errors as demo

pytest.importorskip("tabulate")


def test_demo_table(tmp_path):
    out = tmp_path / "demo.md"
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        rows, columns = demo.run(n=11, f=2, d=300, seed=1)
        text = demo.main(["--n", "11", "--f", "2", "--d", "300", "--out", str(out)])
    assert out.read_text() == text
    assert columns[0] == "none" and len(columns) == len(demo.attack_suite(11, 2))
    errors = {row[0]: row[1:] for row in rows}
    # Every registered aggregator whose declared constraint admits n=11, f=2.
    assert set(errors) == {s.name for s in aggregators.specs() if s.constraint.explain(11, 2) is None}
    assert "bulyan" in errors and "krum" in errors  # n = 11 >= 4f + 3
    for name, values in errors.items():
        if name != "mean":
            assert all(math.isfinite(v) for v in values), (name, values)
    assert errors["mean"][0] == pytest.approx(0.0, abs=1e-6)
