"""The main job, ``rbyz demo``: nine defences under no attack, ALIE and IPM, on real data.

The grid is the packaged sweep file ``demo.toml`` (print it with ``rbyz demo --show``; copy it
to change it and run it with ``rbyz sweep``): n = 25 workers, f = 5 Byzantine, the 784-100-10
MLP of the ALIE paper, Fashion-MNIST when installed (``sudo apt-get install
dataset-fashion-mnist``), else scikit-learn's 8x8 digits. It writes ``results.csv``, the report
(``report.md``: final test accuracy per defence and attack, each defence's worst case), the
accuracy plot and the heatmap into the output directory, and prints the table.
"""

from __future__ import annotations

import importlib.resources
import tomllib
from collections.abc import Sequence
from pathlib import Path

from rbyz.sim import config as config_lib
from rbyz.sim import report, sweep, train


def document() -> dict:
    """The demo's sweep document (the packaged ``demo.toml``)."""
    return tomllib.loads(source())


def source() -> str:
    """The text of the packaged ``demo.toml``."""
    return importlib.resources.files("rbyz.sim").joinpath("demo.toml").read_text()


def main(out: str | Path = "runs/demo", *, overrides: Sequence[str] = (),
         progress: bool = True) -> str:
    """Runs (or resumes) the demo sweep into ``out`` and returns the text it prints."""
    doc = document()
    base = config_lib.override(config_lib.from_dict({k: v for k, v in doc.items()
                                                     if k != "sweep"}), overrides)
    dataset = train.dataset_of(base)
    rows = sweep.run_sweep(doc, out, overrides=overrides, progress=progress)
    out = Path(out)
    lines = [f"rbyz demo: n={base.workers.n}, f={base.workers.f}, {base.train.steps} steps, "
             f"{dataset.name} ({dataset.source}); final test accuracy (%):", "",
             report.accuracy_table(rows), "",
             f"wrote {out / 'results.csv'}, {out / 'report.md'}, {out / 'accuracy.png'}, "
             f"{out / 'heatmap.png'}"]
    if dataset.note:
        lines.append(dataset.note)
    return "\n".join(lines)


__all__ = ("document", "main", "source")
