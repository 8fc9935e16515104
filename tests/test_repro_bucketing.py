"""Karimireddy, He, Jaggi (ICLR 2022), small setting: the directions of the bucketing grid.

The reproduction (``experiments/bucketing_cclip.toml``, ``docs/reproductions/bucketing_cclip.md``)
trains 96 runs of 600 steps; here five of its runs, shortened to 200 steps on seed 0 and
evaluated on 2 000 test images (about 35 s of CPU), check the directions the full grid
reproduces:

- bucketing (s = 2) helps RFA without worker momentum (IPM: 24 -> 60% in the full grid; it
  helps CM and Krum too, which the full grid shows);
- worker momentum alone hurts the median under ALIE;
- with momentum, centered clipping beats the median under ALIE.

The claim the full grid does not reproduce (CClip with momentum the best rule, at 98%) is not
asserted. Needs Fashion-MNIST (the directions are those of that dataset).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from rbyz.sim import config, data, train

CONFIG = Path(__file__).parent.parent / "experiments" / "bucketing_cclip.toml"
SMALL = ["train.steps=200", "train.eval_every=200", "data.test_size=2000"]
RUNS = [("ipm", "RFA"), ("ipm", "RFA+b2"), ("alie", "CM"), ("alie", "CM+m0.9"),
        ("alie", "CClip+m0.9")]


def _fashion_mnist_present() -> bool:
    try:
        data.load("fashion_mnist", test_size=10)
    except FileNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _fashion_mnist_present(),
                       reason="needs Fashion-MNIST (sudo apt-get install dataset-fashion-mnist)"),
]


@functools.cache
def _accuracy() -> dict[tuple[str, str], float]:
    """Final test accuracy (%) of the selected runs of the grid, on seed 0, small setting."""
    grid = config.expand(config.read(CONFIG))
    chosen = {(e.attack_label, e.rule_label): e for e in grid if e.seed == 0}
    out = {}
    for key in RUNS:
        exp = config.override(chosen[key], SMALL)
        out[key] = 100 * train.train(exp).rows[-1]["test_accuracy"]
    return out


def test_the_config_is_the_papers_grid():
    grid = config.expand(config.read(CONFIG))
    assert len(grid) == 4 * 2 * 2 * 2 * 3
    labels = {e.rule_label for e in grid}
    assert labels == {r + s for r in ("CM", "Krum", "RFA", "CClip")
                      for s in ("", "+b2", "+m0.9", "+b2+m0.9")}
    exp = next(e for e in grid if e.rule_label == "CClip+b2+m0.9" and e.attack_label == "alie")
    assert (exp.workers.n, exp.workers.f, exp.workers.momentum) == (25, 5, 0.9)
    assert exp.defence.hparams == {"tau": 10.0, "iterations": 3}
    assert exp.defence.pre_hparams == {"bucketing": {"s": 2}}
    assert (exp.data.partition, exp.data.batch_size, exp.train.lr, exp.train.steps) == (
        "sorted", 32, 0.01, 600)
    assert exp.attack.hparams == {"variant": "v2", "ddof": 1}  # z = 0.2533 at n = 25, f = 5
    rfa = next(e for e in grid if e.rule_label == "RFA")
    assert rfa.defence.hparams == {"iterations": 8, "nu": 0.1, "init": "zero"}


def test_bucketing_helps_rfa_without_momentum():
    acc = _accuracy()  # 200 steps, seed 0: 29 -> 56%
    assert acc["ipm", "RFA+b2"] > acc["ipm", "RFA"] + 10, acc


def test_momentum_alone_hurts_the_median_under_alie():
    acc = _accuracy()  # 200 steps, seed 0: 50 -> 42%
    assert acc["alie", "CM+m0.9"] < acc["alie", "CM"] - 4, acc


def test_with_momentum_centered_clipping_beats_the_median_under_alie():
    acc = _accuracy()  # 200 steps, seed 0: 52 vs 42%
    assert acc["alie", "CClip+m0.9"] > acc["alie", "CM+m0.9"] + 5, acc
