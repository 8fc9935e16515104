"""``rbyz list``: every rule, pre-aggregator, attack and algorithm, read from the declarations.

Example:
  >>> sorted(row["name"] for row in rows("preaggregator"))
  ['arc', 'bucketing', 'clip', 'nnm']
  >>> table("preaggregator").splitlines()[0]
  '## preaggregators (4)'
"""

from __future__ import annotations

from rbyz import aggregators, attacks, preaggregators
from rbyz.sim import train

KINDS = ("aggregator", "preaggregator", "attack", "algorithm")
COLUMNS = ("name", "constraint", "hyperparameters", "key", "state", "cost", "reference")

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


def table(kind: str | None = None) -> str:
    """The catalogue as Markdown tables, one per kind."""
    from tabulate import tabulate

    sections = []
    for k in (KINDS if kind is None else (kind,)):
        entries = [r for r in rows(k) if r["kind"] == k]
        body = [[r.get(c, "") for c in COLUMNS] for r in entries]
        sections.append(f"## {k}s ({len(entries)})\n\n"
                        + tabulate(body, headers=COLUMNS, tablefmt="github"))
    return "\n\n".join(sections)


__all__ = ("KINDS", "rows", "table")
