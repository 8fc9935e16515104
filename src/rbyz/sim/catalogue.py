"""``rbyz list``: every rule, pre-aggregator, attack and algorithm, read from the declarations.

:func:`table` is the full catalogue (``rbyz list``); :func:`readme_table` its compact form, the
README's catalogue section, which ``python -m rbyz.sim.catalogue README.md`` rewrites in place
(between the ``<!-- catalogue -->`` markers) and ``tests/test_readme.py`` checks is current.

Example:
  >>> sorted(row["name"] for row in rows("preaggregator"))
  ['arc', 'bucketing', 'clip', 'nnm']
  >>> table("preaggregator").splitlines()[0]
  '## preaggregators (4)'
  >>> rows("aggregator")[0]["weights"], rows("aggregator")[0]["reports"]  # bulyan
  ('no', 'no')
"""

from __future__ import annotations

from rbyz import aggregators, attacks, preaggregators
from rbyz.sim import train

KINDS = ("aggregator", "preaggregator", "attack", "algorithm")
COLUMNS = ("name", "constraint", "hyperparameters", "key", "state", "cost", "reference")
# Columns only some kinds have, after "state".
EXTRA = {"aggregator": ("weights", "reports"), "attack": ("knowledge",)}
MARKERS = ("<!-- catalogue:start -->", "<!-- catalogue:end -->")

_ALGORITHM_NOTES = {
    "signsgd_majority": ("f < n/2 sign flips", "sign vote of the workers (Bernstein et al. 2019)"),
    "noisy_sign_sgd": ("-", "Chen et al., NeurIPS 2020, Alg. 3"),
    "noisy_median_sgd": ("-", "Chen et al., NeurIPS 2020, Alg. 4"),
    "detox": ("n % r == 0", "Rajput et al., NeurIPS 2019 (grouped sampling)"),
    "draco": ("n % r == 0, r >= 2f + 1", "Chen et al., ICML 2018 (grouped sampling)"),
    "election_coding": ("Byzantine workers fixed", "Sohn et al., NeurIPS 2020 (per-partition "
                                                   "sampling)"),
}


def rows(kind: str | None = None) -> list[dict]:
    """One dict per entry (``COLUMNS`` and ``kind``), for ``kind`` or for all kinds."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"rbyz list: unknown kind {kind!r}; use one of {', '.join(KINDS)}.")
    out = []
    for name, registry in (("aggregator", aggregators), ("preaggregator", preaggregators),
                           ("attack", attacks)):
        if kind in (None, name):
            out += [spec.summary() for spec in registry.specs()]
    if kind in (None, "attack"):
        out.append({"name": "label_flip", "kind": "attack", "constraint": "f < n",
                    "hyperparameters": "", "key": "no", "state": "-",
                    "cost": "data attack (labels y -> C - 1 - y)",
                    "reference": "Karimireddy, He, Jaggi, ICLR 2022"})
    if kind in (None, "algorithm"):
        for name, hparams in train.ALGORITHMS.items():
            constraint, reference = _ALGORITHM_NOTES[name]
            out.append({"name": name, "kind": "algorithm", "constraint": constraint,
                        "hyperparameters": ", ".join(f"{k}={v!r}" for k, v in hparams.items()),
                        "key": "-", "state": "-", "cost": "-", "reference": reference})
    return out


def columns(kind: str) -> tuple[str, ...]:
    """The columns of ``kind``'s table: :data:`COLUMNS` with the kind's :data:`EXTRA` ones."""
    at = COLUMNS.index("state") + 1
    return COLUMNS[:at] + EXTRA.get(kind, ()) + COLUMNS[at:]


def table(kind: str | None = None) -> str:
    """The catalogue as Markdown tables, one per kind."""
    from tabulate import tabulate

    sections = []
    for k in (KINDS if kind is None else (kind,)):
        entries = [r for r in rows(k) if r["kind"] == k]
        body = [[r.get(c, "") for c in columns(k)] for r in entries]
        sections.append(f"## {k}s ({len(entries)})\n\n"
                        + tabulate(body, headers=columns(k), tablefmt="github"))
    return "\n\n".join(sections)


def _short_reference(spec) -> str:
    """``Blanchard et al., NeurIPS 2017; ...``: the first author of each reference."""
    out = []
    for r in spec.reference:
        authors = [a.strip() for a in r.authors.split(",")]
        out.append(f"{authors[0]}{' et al.' if len(authors) > 1 else ''}, {r.venue} {r.year}")
    return "; ".join(out)


def _readme_rows(kind: str) -> list[list[str]]:
    registry = {"aggregator": aggregators, "preaggregator": preaggregators,
                "attack": attacks}[kind]
    body = []
    for spec in registry.specs():
        flags = []
        if spec.key:
            flags.append("key")
        if spec.state is not None:
            flags.append("state")
        if spec.weights:
            flags.append("weights")
        if spec.reports:
            flags.append("reports")
        if kind == "attack":
            flags.append(f"knows {spec.knowledge}")
        body.append([f"`{spec.name}`", spec.constraint.text, spec.cost,
                     ", ".join(flags) or "-", _short_reference(spec)])
    if kind == "attack":  # a data attack: not a function of the updates, not in the registry
        body.append(["`label_flip`", "f < n", "data attack (labels y -> C - 1 - y)",
                     "in the harness", "Karimireddy et al., ICLR 2022"])
    return body


def readme_table() -> str:
    """The README's catalogue: aggregators, pre-aggregators and attacks with their constraint
    on ``n`` and ``f``, cost in ``n`` and ``d``, declared capabilities and references."""
    from tabulate import tabulate

    headers = ("name", "n, f", "cost", "declares", "reference")
    sections = []
    for kind in ("aggregator", "preaggregator", "attack"):
        body = _readme_rows(kind)
        sections.append(f"**{kind}s ({len(body)})**\n\n"
                        + tabulate(body, headers=headers, tablefmt="github"))
    return "\n\n".join(sections)


def readme_block(text: str) -> tuple[int, int]:
    """``(start, end)`` of the generated catalogue between the :data:`MARKERS` in ``text``."""
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start < 0 or end < start:
        raise ValueError(f"catalogue: no {MARKERS[0]} ... {MARKERS[1]} block in the README.")
    return start + len(MARKERS[0]), end


def write_readme(path) -> bool:
    """Rewrites the catalogue block of the README at ``path`` atomically; whether it changed."""
    import pathlib

    from rbyz.sim import io

    path = pathlib.Path(path)
    text = path.read_text()
    start, end = readme_block(text)
    new = text[:start] + "\n" + readme_table() + "\n" + text[end:]
    if new == text:
        return False
    io.atomic_write_text(path, new)
    return True


__all__ = ("KINDS", "columns", "readme_table", "rows", "table", "write_readme")


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or ["README.md"]:
        print(f"{name}: {'rewritten' if write_readme(name) else 'up to date'}")
