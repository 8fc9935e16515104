"""Tests of rbyz.privacy.accounting: dp-accounting called by hand, the worked numbers of the
privacy reference, the analytic Gaussian mechanism, calibration, truncation and bad input."""

import importlib.util
import math
import sys

import pytest

dp = pytest.importorskip("dp_accounting")

from dp_accounting import pld, rdp  # noqa: E402
from scipy import optimize, stats  # noqa: E402

from rbyz.privacy import accounting  # noqa: E402
from rbyz.privacy.accounting import (  # noqa: E402
    Mechanism, calibrate, check, delta_for, dp_event, epsilon, relation)

DELTA = 1e-5
Q_N, Q_B = 6000, 128                     # q = 128 / 6000 = 0.0213, the reference's setting


def _mech(noise="gaussian", z=1.28, steps=200, sampling="poisson", n=Q_N, b=Q_B, max_batch=0):
    return Mechanism(noise, z, steps, sampling, n, b, max_batch)


def _by_hand(m: Mechanism, accountant: str, interval: float):
    """The same run, built directly with dp_accounting."""
    base = dp.GaussianDpEvent(m.noise_multiplier) if m.noise == "gaussian" else (
        dp.LaplaceDpEvent(m.noise_multiplier))
    q = m.batch_size / m.dataset_size
    if m.sampling == "full":
        step = base
    elif m.sampling == "without_replacement":
        step = dp.SampledWithoutReplacementDpEvent(m.dataset_size, m.batch_size, base)
    elif 0 < m.max_batch < m.dataset_size:
        step = dp.TruncatedSubsampledGaussianDpEvent(m.dataset_size, q, m.max_batch,
                                                     m.noise_multiplier)
    else:
        step = dp.PoissonSampledDpEvent(q, base)
    rel = (dp.NeighboringRelation.REPLACE_ONE if m.sampling == "without_replacement"
           else dp.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc = (rdp.RdpAccountant(neighboring_relation=rel) if accountant == "rdp"
           else pld.PLDAccountant(neighboring_relation=rel, value_discretization_interval=interval))
    return acc.compose(dp.SelfComposedDpEvent(step, m.steps))


SUPPORTED = [
    (_mech(), "pld"),
    (_mech(), "rdp"),
    (_mech(max_batch=150), "pld"),
    (_mech("laplace", 2.0), "pld"),
    (_mech(sampling="without_replacement"), "rdp"),
    (_mech(z=6.0, sampling="full"), "pld"),
    (_mech(z=6.0, sampling="full"), "rdp"),
    (_mech("laplace", 50.0, sampling="full"), "pld"),
    (_mech("laplace", 50.0, sampling="full"), "rdp"),
]


def _name(case):
    m, acc = case
    return f"{m.sampling}{'-truncated' if m.truncated else ''}-{m.noise}-{acc}"


# ------------------------------------------------------------------------------------------------
# Agreement with dp_accounting.

@pytest.mark.parametrize("case", SUPPORTED, ids=_name)
def test_agrees_with_dp_accounting_by_hand(case):
    m, acc = case
    check(m, acc)
    interval = accounting.pld_interval(m)
    direct = _by_hand(m, acc, interval)
    assert epsilon(m, DELTA, acc) == pytest.approx(direct.get_epsilon(DELTA), rel=1e-12)
    assert delta_for(m, 1.0, acc) == pytest.approx(direct.get_delta(1.0), rel=1e-9, abs=1e-300)
    assert dp_event(m) == direct.ledger
    if acc == "pld":      # the adaptive grid is an upper bound, within 0.5 % of a 3x finer one
        finer = _by_hand(m, acc, interval / 3).get_epsilon(DELTA)
        assert finer - 1e-9 <= epsilon(m, DELTA, acc) <= finer * 1.005


def test_coarser_pld_grid_is_pessimistic():
    m = _mech(steps=1000)
    eps = [_by_hand(m, "pld", h).get_epsilon(DELTA) for h in (1e-4, 1e-3, 1e-2)]
    assert eps[0] <= eps[1] <= eps[2]
    assert eps[0] == pytest.approx(2.6945, abs=1e-3)


def test_pld_discretization_constant_is_read_at_call_time(monkeypatch):
    m = _mech("gaussian", 6.4, 1000)
    default = epsilon(m, DELTA)
    monkeypatch.setattr(accounting, "PLD_DISCRETIZATION", 0.01)
    finer = epsilon(m, DELTA)
    assert finer <= default <= finer * 1.005


def test_relation():
    assert relation("poisson") == relation("full") == "add_or_remove_one"
    assert relation("without_replacement") == "replace_one"


def test_mechanism_is_hashable_and_knows_truncation():
    assert len({_mech(), _mech()}) == 1
    assert _mech(max_batch=150).truncated
    assert not _mech(max_batch=Q_N).truncated and not _mech(max_batch=0).truncated
    assert not _mech(sampling="full", max_batch=150).truncated


# ------------------------------------------------------------------------------------------------
# The worked numbers (PRIVACY.md, section 1.4; delta = 1e-5).

@pytest.mark.parametrize("m, acc, expected, tol", [
    (_mech(z=6.0, steps=50_000, sampling="full"), "rdp", 876.0, 1.0),
    (_mech(z=1.28, steps=1000), "rdp", 2.96, 0.005),
    (_mech(z=1.28, steps=10_000), "rdp", 10.62, 0.01),
    (_mech(z=1.28, steps=1000), "pld", 2.695, 0.005),
    (_mech(z=1.28, steps=10_000), "pld", 9.86, 0.02),
    (_mech(z=6.4, steps=1000), "rdp", 0.40, 0.005),
    (_mech(z=6.4, steps=10_000), "rdp", 1.40, 0.005),
    (_mech(z=6.4, steps=1000), "pld", 0.37, 0.005),
    (_mech(z=6.4, steps=10_000), "pld", 1.28, 0.01),
    (_mech("laplace", 2.0, 1000), "pld", 1.22, 0.01),
    (_mech("laplace", 2.0, 1000, sampling="full"), "rdp", 172.8, 0.1),
], ids=lambda v: str(v) if not isinstance(v, Mechanism) else f"{v.noise}-{v.sampling}-"
                                                              f"z{v.noise_multiplier}-T{v.steps}")
def test_worked_numbers(m, acc, expected, tol):
    assert epsilon(m, DELTA, acc) == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize("target, z", [(8.0, 1.536), (1.0, 8.68)])
def test_worked_calibration_rdp(target, z):
    assert calibrate(_mech(steps=10_000), target, DELTA, "rdp") == pytest.approx(z, abs=0.005)


def test_jax_privacy_doctest_numbers():
    # jax_privacy.accounting.dpsgd_event(3, 512, sampling_prob=0.1): PLD 3.77, RDP 4.05 at 1e-6.
    m = _mech(z=3.0, steps=512, n=1000, b=100)
    assert epsilon(m, 1e-6, "pld") == pytest.approx(3.77, abs=0.01)
    assert epsilon(m, 1e-6, "rdp") == pytest.approx(4.05, abs=0.01)
    assert calibrate(m, 1.0, 1e-6, "pld") == pytest.approx(9.66, abs=0.02)


# ------------------------------------------------------------------------------------------------
# The analytic Gaussian mechanism (Balle and Wang 2018, Theorem 8): sensitivity 1, std s.

def _exact_gaussian_delta(eps: float, s: float) -> float:
    return (stats.norm.cdf(1 / (2 * s) - eps * s)
            - math.exp(eps) * stats.norm.cdf(-1 / (2 * s) - eps * s))


def _exact_gaussian_epsilon(s: float, delta: float) -> float:
    return optimize.brentq(lambda e: _exact_gaussian_delta(e, s) - delta, 0.0, 500.0,
                           xtol=1e-12)


@pytest.mark.parametrize("z, steps", [(0.5, 1), (1.0, 1), (2.0, 1), (5.0, 1), (10.0, 100)])
def test_one_gaussian_release_matches_the_analytic_gaussian(z, steps):
    # T unsampled Gaussian releases of std z are one release of std z / sqrt(T).
    m = _mech(z=z, steps=steps, sampling="full")
    exact = _exact_gaussian_epsilon(z / math.sqrt(steps), DELTA)
    eps_pld = epsilon(m, DELTA, "pld")
    assert exact - 1e-9 <= eps_pld <= exact * 1.01
    assert epsilon(m, DELTA, "rdp") >= exact - 1e-9
    assert delta_for(m, exact, "pld") == pytest.approx(DELTA, rel=0.05)


# ------------------------------------------------------------------------------------------------
# Calibration.

@pytest.mark.parametrize("m, acc", [
    (_mech(steps=1000), "pld"),
    (_mech(steps=1000), "rdp"),
    (_mech("laplace", steps=1000), "pld"),
    (_mech("laplace", steps=1000, sampling="full"), "pld"),
    (_mech("laplace", steps=1000, sampling="full"), "rdp"),
    (_mech(steps=1000, sampling="full"), "pld"),
], ids=lambda v: v if isinstance(v, str) else f"{v.noise}-{v.sampling}")
def test_calibrate_round_trip_and_monotone(m, acc):
    zs = []
    for target in (0.5, 8.0):
        z = calibrate(m, target, DELTA, acc)
        got = epsilon(m._replace(noise_multiplier=z), DELTA, acc)
        assert target * (1 - 5e-3) <= got <= target
        zs.append(z)
    assert zs[0] > zs[1] > 0


def test_calibrate_round_trip_truncated():
    # (Sampling without replacement goes through the same code; its RDP costs 0.5 s a call, so
    # its calibration, about 12 calls, is left out here.)
    m = _mech(steps=300, max_batch=150)
    z = calibrate(m, 2.0, DELTA)
    assert 2.0 * (1 - 5e-3) <= epsilon(m._replace(noise_multiplier=z), DELTA) <= 2.0


def test_calibrate_ignores_the_given_noise():
    m = _mech("laplace", steps=100, sampling="full")
    assert calibrate(m._replace(noise_multiplier=0.0), 8.0, DELTA, "rdp") == (
        calibrate(m._replace(noise_multiplier=123.0), 8.0, DELTA, "rdp"))


def test_calibrate_large_target():
    m = _mech(steps=1000)
    z = calibrate(m, 100.0, DELTA)
    assert 100.0 * (1 - 5e-3) <= epsilon(m._replace(noise_multiplier=z), DELTA) <= 100.0


# ------------------------------------------------------------------------------------------------
# Truncated Poisson sampling.

def test_truncation_far_above_the_mean_is_untruncated():
    m = _mech(steps=1000)
    plain = epsilon(m, DELTA)
    assert epsilon(m._replace(max_batch=400), DELTA) == pytest.approx(plain, rel=1e-6)


def test_truncation_near_the_mean_costs_privacy():
    # A draw above the capacity keeps a random subset: smaller capacities give a larger ε,
    # never below the untruncated one.
    m = _mech(steps=1000)
    plain = epsilon(m, DELTA)
    eps = [epsilon(m._replace(max_batch=c), DELTA) for c in (128, 160, 256)]
    assert eps[0] >= eps[1] >= eps[2] >= plain * (1 - 1e-9)
    assert eps[0] > 2 * plain


# ------------------------------------------------------------------------------------------------
# No noise.

@pytest.mark.parametrize("m, acc", [(_mech(z=0.0), "pld"), (_mech(z=0.0), "rdp"),
                                    (_mech("laplace", 0.0, sampling="full"), "rdp"),
                                    (_mech("laplace", 0.0), "pld")],
                         ids=["gaussian-pld", "gaussian-rdp", "laplace-rdp", "laplace-pld"])
def test_no_noise_no_privacy(m, acc):
    assert epsilon(m, DELTA, acc) == math.inf
    assert delta_for(m, 1.0, acc) == 1.0


def test_delta_for_inverts_epsilon():
    m = _mech(steps=1000)
    eps = epsilon(m, DELTA)
    assert delta_for(m, eps) == pytest.approx(DELTA, rel=0.01)
    assert delta_for(m, 2 * eps) < DELTA < delta_for(m, eps / 2)


# ------------------------------------------------------------------------------------------------
# Bad input.

BAD = [
    (lambda: epsilon(_mech(), 0), r"delta must be in \(0, 1\).*delta=0"),
    (lambda: epsilon(_mech(), 1), r"delta must be in \(0, 1\)"),
    (lambda: epsilon(_mech(), -1.0), r"delta=-1.0"),
    (lambda: epsilon(_mech(), 2.0), r"delta must be in \(0, 1\)"),
    (lambda: epsilon(_mech(), float("nan")), r"delta must be in"),
    (lambda: calibrate(_mech(), 1.0, 0.0), r"calibrate: delta must be in"),
    (lambda: delta_for(_mech(), 0.0), r"target_epsilon must be a finite number > 0"),
    (lambda: calibrate(_mech(), -1.0, DELTA), r"target_epsilon=-1.0"),
    (lambda: calibrate(_mech(), math.inf, DELTA), r"target_epsilon must be a finite"),
    (lambda: epsilon(_mech(n=100, b=128), DELTA),
     r"batch larger than a worker's data: the worker holds N=100 records"),
    (lambda: epsilon(_mech(sampling="without_replacement", n=100, b=101), DELTA, "rdp"),
     r"batch_size=101 is a batch larger"),
    (lambda: epsilon(_mech("laplace", 2.0), DELTA, "rdp"),
     r"the RDP accountant cannot compose sampled Laplace noise; use accountant='pld'"),
    (lambda: epsilon(_mech(sampling="without_replacement"), DELTA, "pld"),
     r"PLD accountant does not support sampling='without_replacement'.*accountant='rdp'"),
    (lambda: epsilon(_mech("laplace", 2.0, sampling="without_replacement"), DELTA, "rdp"),
     r"no accountant for Laplace noise with sampling='without_replacement'.*gaussian"),
    (lambda: epsilon(_mech("laplace", 2.0, max_batch=150), DELTA),
     r"no accountant for Laplace noise with truncated Poisson.*max_batch=0"),
    (lambda: dp_event(_mech("laplace", 2.0, max_batch=150)),
     r"dp_event: there is no event for Laplace noise with truncated"),
    (lambda: epsilon(_mech(max_batch=150), DELTA, "rdp"),
     r"RDP accountant has no bound for truncated Poisson.*accountant='pld'"),
    (lambda: epsilon(_mech("laplace", 1e-3, 1000, n=6000, b=120), DELTA),
     r"noise_multiplier=0.001 is too small for the PLD construction.*Raise the noise"),
    (lambda: epsilon(_mech("cauchy"), DELTA), r"unknown noise 'cauchy'; choose one of "
                                             r"'gaussian', 'laplace'"),
    (lambda: epsilon(_mech(sampling="shuffle"), DELTA),
     r"unknown sampling 'shuffle'; choose one of 'poisson', 'without_replacement', 'full'"),
    (lambda: epsilon(_mech(), DELTA, "moments"),
     r"unknown accountant 'moments'; choose one of 'pld', 'rdp'"),
    (lambda: relation("shuffle"), r"relation: unknown sampling 'shuffle'"),
    (lambda: epsilon(_mech(steps=0), DELTA), r"steps must be >= 1; got steps=0"),
    (lambda: epsilon(_mech(steps=1.5), DELTA), r"steps must be an int >= 1; got 1.5"),
    (lambda: epsilon(_mech(steps=True), DELTA), r"steps must be an int"),
    (lambda: epsilon(_mech(n=0), DELTA), r"dataset_size must be >= 1"),
    (lambda: epsilon(_mech(b=0), DELTA), r"batch_size must be >= 1"),
    (lambda: epsilon(_mech(max_batch=-1), DELTA), r"max_batch must be >= 0"),
    (lambda: epsilon(_mech(z=-1.0), DELTA), r"noise_multiplier must be a finite number >= 0"),
    (lambda: epsilon(_mech(z=math.inf), DELTA), r"noise_multiplier=inf"),
    (lambda: epsilon(_mech(z=float("nan")), DELTA), r"noise_multiplier must be a finite"),
    (lambda: calibrate(_mech(sampling="without_replacement"), 1.0, DELTA, "pld"),
     r"calibrate: the PLD accountant does not support"),
]


@pytest.mark.parametrize("call, match", BAD, ids=[m for _, m in BAD])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("m, acc, match", [
    (_mech("laplace", 2.0), "rdp", "cannot compose sampled Laplace"),
    (_mech(sampling="without_replacement"), "pld", "use accountant='rdp'"),
    (_mech(n=10, b=20), "pld", "holds N=10 records"),
])
def test_check_raises_without_computing(monkeypatch, m, acc, match):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ValueError, match=f"check: .*{match}"):
        check(m, acc)
    check(_mech(), "pld")                # a good mechanism passes without dp-accounting


def test_full_sampling_ignores_batch_size_and_capacity():
    m = _mech(z=6.0, sampling="full", steps=10)
    check(m._replace(batch_size=0, max_batch=5), "rdp")
    assert epsilon(m._replace(batch_size=10 ** 9), DELTA, "rdp") == epsilon(m, DELTA, "rdp")


# ------------------------------------------------------------------------------------------------
# dp-accounting missing.

def test_missing_dp_accounting_is_an_import_error_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ImportError, match=r"needs dp-accounting.*pip install 'rbyz\[privacy\]'"):
        accounting._dp()
    with pytest.raises(ImportError, match=r"rbyz\[privacy\]"):
        epsilon(_mech(), DELTA)


def test_module_imports_without_dp_accounting(monkeypatch):
    # A fresh copy of the module (the imported one stays as it is).
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    spec = importlib.util.spec_from_file_location("_accounting_copy", accounting.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.SAMPLINGS == accounting.SAMPLINGS
    assert copy.relation("without_replacement") == "replace_one"
    with pytest.raises(ImportError, match="dp-accounting"):
        copy.epsilon(copy.Mechanism("gaussian", 1.0, 10, "full", 10, 1), DELTA)
