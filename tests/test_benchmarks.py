"""The scaling benchmark runs end to end (all three tables, tiny sizes), as it must on a GPU the
first time it is tried; its numbers are not checked here (wall time is never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "scaling.py"


@pytest.mark.slow
def test_scaling_benchmark_prints_every_table(tmp_path):
    out = tmp_path / "scaling.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--devices", "1", "2", "--layouts",
         "coordinates", "--bandwidth", "--bw-n", "10", "--repeats", "1", "--no-byzfl", "--out",
         str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("Device: cpu", "## Devices and layouts", "## Memory bandwidth",
                    "## Full training step"):
        assert heading in text
    step = text[text.index("## Full training step"):]
    assert "| krum " in step and "coordinates" in step
