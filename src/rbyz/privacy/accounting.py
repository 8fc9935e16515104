"""The ε of a worker's noisy releases, from Google's ``dp-accounting`` (host side, pure Python).

What is accounted: each worker ``i`` on its own, over its own ``N_i`` records and its ``T``
releases ``g_i + b xi_i`` (a per-example clipped sum or mean plus that worker's own noise,
:mod:`rbyz.privacy.clipping`). The noise is added before the release leaves the worker, so the
guarantee holds against the server, the other workers and any Byzantine worker (worker-level
local DP); the sign, the coordinate-wise median and every robust rule after it are
post-processing and cannot weaken it. The workers hold disjoint data, so a record's guarantee is
its worker's ε (parallel composition): one accountant per worker, never one for the run.

A run of one worker is a :class:`Mechanism`; :func:`dp_event` turns it into a ``dp_accounting``
event (one step's event, self-composed ``T`` times) and :func:`epsilon`, :func:`delta_for` and
:func:`calibrate` compose it with the RDP or the PLD accountant. What each supports, checked by
:func:`check` before anything is computed (the message says what to change):

========================  ================================  =================  ==========
sampling                  one step's event                  Gaussian           Laplace
========================  ================================  =================  ==========
``poisson``               ``PoissonSampledDpEvent``         RDP, PLD           PLD
``poisson``, truncated    ``TruncatedSubsampledGaussian``   PLD                none
``without_replacement``   ``SampledWithoutReplacement``     RDP (replace one)  none
``full``                  the mechanism itself              RDP, PLD           RDP, PLD
========================  ================================  =================  ==========

``z`` (:attr:`Mechanism.noise_multiplier`) is the noise's std (Gaussian) or scale (Laplace)
over the sensitivity of the released sum under :func:`relation` (L2 for Gaussian, L1 for
Laplace), as ``dp_accounting.GaussianDpEvent`` and ``LaplaceDpEvent`` define it: ``C`` for a
sum of per-example clipped gradients under add-or-remove-one, ``2C`` under replace-one.

The PLD grid (:func:`pld_interval`). PLD discretisation is pessimistic: a coarser grid gives a
larger ε, still an upper bound (checked: every coarser grid below gave an ε at or above the finer
one, and the PLD ε of one Gaussian release is at or above the exact one of Balle and Wang). Its
relative error depends on the grid step over one step's privacy-loss scale (about ``q / z`` for
Poisson sampling; it grows as that ratio squared), not on ε or ``T``, so no fixed step fits all
settings. Measured (2 shared CPU cores, δ = 1e-5, dp-accounting 0.6.0; "+x %" is against a grid
of ``min(1e-4, 0.01 q / z)``):

- the library's default 1e-4 is accurate but slow where the loss is wide: at ``T = 10^4``, full
  batch ``z = 6``: 14 s; truncated Poisson (``q = 128/6000``, capacity 160, ``z = 1.28``): 4.1 s;
  Poisson (same ``q`` and ``z``): 0.6-0.9 s, ε 9.8613;
- a fixed 1e-3 is faster (Poisson 0.1 s, ε 9.8638, +0.03 %; truncated 0.4 s; full batch still
  1.1 s) and too coarse where one step leaks little: ``q = 0.0213``, ``z = 15``: +4.3 %; ``q =
  0.005``, ``z = 6.4``: +13.6 %; Poisson Laplace ``q = 0.005``, ``z = 10``: +46 %. A fixed 3e-3
  is +7 % already at ``q = 0.0213``, ``z = 6.4``;
- the grid used here is ``PLD_DISCRETIZATION * scale``, ``scale = q / z`` (Poisson, truncated or
  not), ``1 / z`` (full, Laplace) or ``sqrt(T) / z`` (full, Gaussian: the ``T`` releases are one
  of std ``z / sqrt(T)``), clipped to :data:`PLD_INTERVAL_BOUNDS`. It was within +0.15 % on a
  grid of ``q`` in 0.001..1, ``z`` in 0.8..20 (Gaussian) and 1..20 (Laplace), ``T`` up to
  10^4, in 0.01-0.65 s each. At ``T = 10^4``, ``q = 128/6000``, ``z = 1.28``: ε 9.8683 (+0.07 %)
  in 0.09 s; truncated to 160: 0.3 s; full batch ``z = 6``: 0.02 s (ε 209.08, as with 1e-4).
  Where ``q / z < 1e-4`` the lower bound 1e-5 takes over (``q = 0.001``, ``z = 20``: +0.4 %; ``q
  = 10^-4``, ``z = 1``: 2.8 s);
- with very little noise (ε in the thousands and more) the grid is also at least ``T q KL /
  PLD_MAX_POINTS``, ``T q KL`` being the mean composed privacy loss, so the grid stays about
  :data:`PLD_MAX_POINTS` wide: ``z = 0.01``, ``q = 0.02``, ``T = 10^3`` takes 0.3 s (ε 205,802;
  205,792 on a fine grid) instead of 3.5 s, and a full batch of ``z = 0.005`` 0.5 s instead of
  a 75 GiB allocation.

Behaviour of dp-accounting 0.6.0 worth knowing: very small Laplace scales overflow the PLD
construction (``OverflowError``, e.g. ``z = 0.001``, ``q = 0.02``) or leave it empty
(``IndexError``): both are reported as a ``ValueError`` asking for more noise; the PLD may also
return ``inf``, a valid but useless bound (Laplace ``z = 0.01``, ``q = 0.001``); the RDP accountant
logs absl warnings (orders left out) for sampled Gaussians near ``z = 0.5`` and takes about 0.5 s
per call for sampling without replacement, whatever ``T``.

Example:
  The worked number: a batch of ``B = 128`` of a worker's ``N = 6000`` records, clip ``C = 1``,
  noise ``b = 0.01`` on the batch mean (``z = b B / C = 1.28``), ``T = 1000`` steps, δ = 1e-5:

  >>> m = Mechanism("gaussian", noise_multiplier=1.28, steps=1000, sampling="poisson",
  ...               dataset_size=6000, batch_size=128)
  >>> round(epsilon(m, 1e-5, "rdp"), 2), round(epsilon(m, 1e-5, "pld"), 1)
  (2.96, 2.7)
  >>> round(calibrate(m._replace(steps=10_000), 8.0, 1e-5, "rdp"), 2)
  1.54

References:
  Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, `Deep Learning with Differential
  Privacy`, CCS 2016 (the moments accountant, Poisson-subsampled Gaussian).
  Mironov, `Rényi Differential Privacy`, CSF 2017 (RDP; the Laplace mechanism, Prop. 6).
  Wang, Balle, Kasiviswanathan, `Subsampled Rényi Differential Privacy and Analytical Moments
  Accountant`, AISTATS 2019 (sampling without replacement, replace-one).
  Koskela, Jälkö, Honkela, `Computing Tight Differential Privacy Guarantees Using FFT`, AISTATS
  2020; Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, `Connect the Dots: Tighter Discrete
  Approximations of Privacy Loss Distributions`, PETS 2022 (the PLD accountant).
  Balle, Wang, `Improving the Gaussian Mechanism for Differential Privacy: Analytical Calibration
  and Optimal Denoising`, ICML 2018 (the exact ε of one Gaussian release).
  Chua et al., truncated Poisson sampling (a draw above the capacity keeps a uniformly random
  subset of it), arXiv:2508.15089, 2025.
  Google ``dp-accounting`` (github.com/google/differential-privacy, ``python/dp_accounting``).
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

SAMPLINGS = ("poisson", "without_replacement", "full")
NOISES = ("gaussian", "laplace")
ACCOUNTANTS = ("pld", "rdp")

# The PLD accountant's grid (value_discretization_interval) as a fraction of one step's privacy
# loss scale; see the module docstring for the measurements and pld_interval for the rule. Read
# at every call, so setting it (e.g. to 0.01) refines every later result.
PLD_DISCRETIZATION = 0.1
# The grid step is clipped to these before the little-noise floor applies.
PLD_INTERVAL_BOUNDS = (1e-5, 0.1)
# With very little noise the grid is at least (a cheap estimate of ε) / PLD_MAX_POINTS.
PLD_MAX_POINTS = 1e5

_PLD_ERRORS = (OverflowError, FloatingPointError, IndexError)


def _dp():
    """``dp_accounting``, imported on first use (it is the optional extra ``rbyz[privacy]``)."""
    try:
        import dp_accounting
        import dp_accounting.pld  # noqa: F401  (the subpackages, for older layouts)
        import dp_accounting.rdp  # noqa: F401
    except ImportError:
        raise ImportError("rbyz.privacy: the accountant needs dp-accounting; install it with "
                          "pip install 'rbyz[privacy]' (or pip install dp-accounting).") from None
    return dp_accounting


class Mechanism(NamedTuple):
    """What ONE worker releases over a run: its own records only (worker-level local DP).

    Attributes:
      noise: ``"gaussian"`` or ``"laplace"`` (:data:`NOISES`).
      noise_multiplier: ``z``, the noise's std (Gaussian) or Laplace scale ``s`` over the
        sensitivity of the released sum under :func:`relation` (L2 for Gaussian, L1 for
        Laplace); ``0``: no noise (ε = inf).
      steps: ``T``, the releases.
      sampling: ``"poisson"``, ``"without_replacement"`` or ``"full"`` (:data:`SAMPLINGS`).
      dataset_size: ``N_i``, the worker's records.
      batch_size: ``B``: the expected batch (Poisson, ``q = B / N_i``) or the exact one (without
        replacement); ignored for ``"full"``.
      max_batch: Poisson only: the static capacity a drawn batch is truncated to (a larger draw
        keeps a uniformly random subset of that size); ``0`` or ``>= dataset_size``: no
        truncation. Ignored for the other samplings.
    """

    noise: str
    noise_multiplier: float
    steps: int
    sampling: str
    dataset_size: int
    batch_size: int
    max_batch: int = 0

    @property
    def truncated(self) -> bool:
        """Whether the Poisson draws are truncated to :attr:`max_batch`."""
        return self.sampling == "poisson" and 0 < self.max_batch < self.dataset_size


# ------------------------------------------------------------------------------------------------
# Validation.

def _fail(fn: str, message: str):
    raise ValueError(f"{fn}: {message}")


def _is_real(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (str, bytes, complex))


def _count(value, fn: str, name: str, minimum: int, hint: str) -> int:
    if isinstance(value, bool):
        _fail(fn, f"{name} must be an int >= {minimum}; got {value!r}. {hint}")
    try:
        as_int = operator.index(value)
    except TypeError:
        _fail(fn, f"{name} must be an int >= {minimum}; got {value!r} of type "
              f"{type(value).__name__}. {hint}")
    if as_int < minimum:
        _fail(fn, f"{name} must be >= {minimum}; got {name}={as_int}. {hint}")
    return as_int


def _check_choice(value, choices, fn: str, name: str) -> None:
    if not isinstance(value, str) or value not in choices:
        _fail(fn, f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")


def _check_delta(delta, fn: str) -> None:
    if not (_is_real(delta) and 0 < float(delta) < 1):
        _fail(fn, f"delta must be in (0, 1), e.g. 1e-5 (below 1 / N_i); got delta={delta!r}.")


def _check_epsilon(target_epsilon, fn: str) -> None:
    if not (_is_real(target_epsilon) and math.isfinite(float(target_epsilon))
            and float(target_epsilon) > 0):
        _fail(fn, f"target_epsilon must be a finite number > 0, e.g. 8.0; got "
              f"target_epsilon={target_epsilon!r}.")


def _check_fields(m: Mechanism, fn: str) -> None:
    _check_choice(m.noise, NOISES, fn, "noise")
    _check_choice(m.sampling, SAMPLINGS, fn, "sampling")
    z = m.noise_multiplier
    if not (_is_real(z) and math.isfinite(float(z)) and float(z) >= 0):
        _fail(fn, f"noise_multiplier must be a finite number >= 0 (0: no noise); got "
              f"noise_multiplier={z!r}.")
    _count(m.steps, fn, "steps", 1, "Pass the number of releases T, e.g. steps=1000.")
    n = _count(m.dataset_size, fn, "dataset_size", 1, "Pass the worker's record count N_i.")
    _count(m.max_batch, fn, "max_batch", 0,
           "Use 0 for no truncation, or the static capacity of a Poisson batch.")
    if m.sampling != "full":
        b = _count(m.batch_size, fn, "batch_size", 1,
                   f"Pass the (expected) batch size B, 1 <= B <= dataset_size={n}.")
        if b > n:
            _fail(fn, f"batch_size={b} is a batch larger than a worker's data: the worker holds "
                  f"N={n} records (dataset_size). Use batch_size <= {n}, or sampling='full' "
                  "for every record every step.")


def _check_support(m: Mechanism, accountant: str, fn: str) -> None:
    _check_choice(accountant, ACCOUNTANTS, fn, "accountant")
    n = m.dataset_size
    if m.noise == "laplace" and m.truncated:
        _fail(fn, f"there is no accountant for Laplace noise with truncated Poisson sampling "
              f"(max_batch={m.max_batch} < dataset_size={n}; dp_accounting's truncated event is "
              f"Gaussian only). Use noise='gaussian', or max_batch=0 (or >= {n}) for untruncated "
              "Poisson sampling.")
    if m.noise == "laplace" and m.sampling == "without_replacement":
        _fail(fn, "there is no accountant for Laplace noise with sampling='without_replacement' "
              "(fixed-size batches). Use noise='gaussian' (accountant='rdp'), or "
              "sampling='poisson' (accountant='pld').")
    if accountant == "rdp" and m.noise == "laplace" and m.sampling == "poisson":
        _fail(fn, "the RDP accountant cannot compose sampled Laplace noise; use "
              "accountant='pld' (or sampling='full').")
    if accountant == "rdp" and m.truncated:
        _fail(fn, f"the RDP accountant has no bound for truncated Poisson sampling "
              f"(max_batch={m.max_batch} < dataset_size={n}); use accountant='pld', or "
              f"max_batch=0 (or >= {n}) for untruncated Poisson sampling.")
    if accountant == "pld" and m.sampling == "without_replacement":
        _fail(fn, "the PLD accountant does not support sampling='without_replacement' "
              "(fixed-size batches, replace-one); use accountant='rdp', or sampling='poisson'.")


def check(m: Mechanism, accountant: str = "pld") -> None:
    """Raises every ``ValueError`` of :func:`epsilon` for ``m`` and ``accountant``, computing
    nothing (``dp-accounting`` need not be installed).

    Args:
      m: the worker's :class:`Mechanism`.
      accountant: ``"pld"`` or ``"rdp"`` (:data:`ACCOUNTANTS`).

    Raises:
      ValueError: an unknown noise, sampling or accountant; a bad count or noise multiplier; a
        batch larger than the worker's data; or a combination no accountant supports (see the
        module's table). The message names the field, its value and what to change.

    Example:
      >>> check(Mechanism("laplace", 2.0, 100, "poisson", 6000, 128), "pld")
      >>> check(Mechanism("laplace", 2.0, 100, "poisson", 6000, 128), "rdp")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: check: the RDP accountant cannot compose sampled Laplace noise; use ...
    """
    _check_fields(m, "check")
    _check_support(m, accountant, "check")


def relation(sampling: str) -> str:
    """The neighbouring relation the ε of a sampling is for.

    ``"replace_one"`` for ``"without_replacement"`` (the batch size is fixed, so the dataset
    size is public and a neighbour replaces one record); ``"add_or_remove_one"`` for
    ``"poisson"`` and ``"full"``.

    Args:
      sampling: one of :data:`SAMPLINGS`.

    Returns:
      ``"add_or_remove_one"`` or ``"replace_one"``.

    Example:
      >>> relation("poisson"), relation("without_replacement")
      ('add_or_remove_one', 'replace_one')
    """
    _check_choice(sampling, SAMPLINGS, "relation", "sampling")
    return "replace_one" if sampling == "without_replacement" else "add_or_remove_one"


# ------------------------------------------------------------------------------------------------
# Events and accountants.

def dp_event(m: Mechanism):
    """The ``dp_accounting`` event of the whole run: ``SelfComposedDpEvent(step, T)``.

    One step's event, with ``base = GaussianDpEvent(z)`` or ``LaplaceDpEvent(z)``:

    - ``"poisson"``: ``PoissonSampledDpEvent(q, base)`` with ``q = B / N``; truncated
      (``0 < max_batch < N``): ``TruncatedSubsampledGaussianDpEvent(N, q, max_batch, z)``;
    - ``"without_replacement"``: ``SampledWithoutReplacementDpEvent(N, B, base)``;
    - ``"full"``: ``base`` (every record every step).

    Args:
      m: the worker's :class:`Mechanism`.

    Returns:
      A ``dp_accounting.DpEvent``. Whether an accountant supports it is :func:`check`'s
      business.

    Raises:
      ValueError: a bad field, or Laplace noise with truncation (there is no such event).
      ImportError: ``dp-accounting`` is not installed.

    Example:
      >>> dp_event(Mechanism("gaussian", 1.0, 10, "full", 100, 1))
      SelfComposedDpEvent(event=GaussianDpEvent(noise_multiplier=1.0), count=10)
    """
    _check_fields(m, "dp_event")
    if m.noise == "laplace" and m.truncated:
        _fail("dp_event", f"there is no event for Laplace noise with truncated Poisson sampling "
              f"(max_batch={m.max_batch} < dataset_size={m.dataset_size}). Use "
              "noise='gaussian', or max_batch=0.")
    dp = _dp()
    z = float(m.noise_multiplier)
    n, steps = int(m.dataset_size), int(m.steps)
    base = dp.GaussianDpEvent(z) if m.noise == "gaussian" else dp.LaplaceDpEvent(z)
    if m.sampling == "full":
        step = base
    elif m.sampling == "without_replacement":
        step = dp.SampledWithoutReplacementDpEvent(n, int(m.batch_size), base)
    elif m.truncated:
        step = dp.TruncatedSubsampledGaussianDpEvent(n, m.batch_size / n, int(m.max_batch), z)
    else:
        step = dp.PoissonSampledDpEvent(m.batch_size / n, base)
    return dp.SelfComposedDpEvent(step, steps)


def pld_interval(m: Mechanism) -> float:
    """The PLD accountant's grid step (``value_discretization_interval``) for ``m``.

    ``max(clip(PLD_DISCRETIZATION * scale, *PLD_INTERVAL_BOUNDS), hint / PLD_MAX_POINTS)`` with
    one step's privacy-loss ``scale = q / z`` (Poisson), ``1 / z`` (full, Laplace) or
    ``sqrt(T) / z`` (full, Gaussian), and ``hint = T q KL(z)`` the mean composed loss (``KL =
    1 / (2 z^2)`` Gaussian, ``1 / z + e^(-1 / z) - 1`` Laplace, ``q = 1`` for full): the grid
    error is about 0.1 % of ε (module docstring) and the grid at most about
    :data:`PLD_MAX_POINTS` wide where the noise is tiny.

    Args:
      m: a :class:`Mechanism` with ``noise_multiplier > 0``.

    Returns:
      The grid step, a float > 0.

    Example:
      >>> pld_interval(Mechanism("gaussian", 1.0, 1000, "poisson", 1000, 10))
      0.001
    """
    _check_fields(m, "pld_interval")
    z = float(m.noise_multiplier)
    if z <= 0:
        _fail("pld_interval", "needs noise_multiplier > 0 (no noise has no PLD: ε = inf).")
    steps = int(m.steps)
    q = 1.0 if m.sampling == "full" else m.batch_size / m.dataset_size
    if m.noise == "gaussian":
        kl = 0.5 / z ** 2
        scale = math.sqrt(steps) / z if m.sampling == "full" else q / z
    else:
        kl = 1.0 / z + math.expm1(-1.0 / z)
        scale = q / z
    low, high = PLD_INTERVAL_BOUNDS
    interval = min(high, max(low, PLD_DISCRETIZATION * scale))
    return float(max(interval, steps * q * kl / PLD_MAX_POINTS))


def _accountant(m: Mechanism, accountant: str, interval: float | None = None):
    dp = _dp()
    rel = (dp.NeighboringRelation.REPLACE_ONE if relation(m.sampling) == "replace_one"
           else dp.NeighboringRelation.ADD_OR_REMOVE_ONE)
    if accountant == "rdp":
        return dp.rdp.RdpAccountant(neighboring_relation=rel)
    return dp.pld.PLDAccountant(neighboring_relation=rel,
                                value_discretization_interval=interval or pld_interval(m))


def _too_small(m: Mechanism, accountant: str, fn: str, err: Exception):
    try:
        _check_support(m, "rdp", fn)
        advice = " or use accountant='rdp'" if accountant == "pld" else ""
    except ValueError:
        advice = ""
    _fail(fn, f"noise_multiplier={m.noise_multiplier} is too small for the "
          f"{accountant.upper()} construction ({type(err).__name__}: {err}); such noise gives "
          f"no meaningful privacy. Raise the noise{advice}.")


def _composed(m: Mechanism, accountant: str, fn: str, interval: float | None = None):
    acc = _accountant(m, accountant, interval)
    event = dp_event(m)
    if not acc.supports(event):  # _check_support should have caught it
        _fail(fn, f"the {accountant.upper()} accountant does not support {event}; see the "
              "support table of rbyz.privacy.accounting.")
    try:
        return acc.compose(event)
    except _PLD_ERRORS as err:
        _too_small(m, accountant, fn, err)


def _epsilon(m: Mechanism, delta: float, accountant: str, fn: str,
             interval: float | None = None) -> float:
    acc = _composed(m, accountant, fn, interval)
    try:
        return float(acc.get_epsilon(float(delta)))
    except _PLD_ERRORS as err:
        _too_small(m, accountant, fn, err)


def epsilon(m: Mechanism, delta: float, accountant: str = "pld") -> float:
    """The worker's ε after the whole run, at ``delta``: ``P[M(D) in S] <= e^ε P[M(D') in S] +
    delta`` for neighbouring ``D, D'`` under :func:`relation`.

    Args:
      m: the worker's :class:`Mechanism`.
      delta: in ``(0, 1)``; below ``1 / N_i`` for a meaningful guarantee.
      accountant: ``"pld"`` (tight; the grid is :func:`pld_interval`) or ``"rdp"`` (a looser
        upper bound, fast).

    Returns:
      ε (``math.inf`` for ``noise_multiplier = 0``).

    Raises:
      ValueError: everything :func:`check` raises, a bad ``delta``, or noise too small for the
        PLD construction.
      ImportError: ``dp-accounting`` is not installed.

    Example:
      >>> m = Mechanism("gaussian", 6.4, 1000, "poisson", 6000, 128)
      >>> round(epsilon(m, 1e-5, "rdp"), 2), round(epsilon(m, 1e-5, "pld"), 2)
      (0.4, 0.37)
      >>> epsilon(m._replace(noise_multiplier=0.0), 1e-5)
      inf
    """
    _check_fields(m, "epsilon")
    _check_delta(delta, "epsilon")
    _check_support(m, accountant, "epsilon")
    if m.noise_multiplier == 0:
        return math.inf
    return _epsilon(m, delta, accountant, "epsilon")


def delta_for(m: Mechanism, target_epsilon: float, accountant: str = "pld") -> float:
    """The worker's δ after the whole run at ``target_epsilon`` (the accountant's
    ``get_delta``).

    Args:
      m: the worker's :class:`Mechanism`.
      target_epsilon: a finite ε > 0.
      accountant: ``"pld"`` or ``"rdp"``.

    Returns:
      δ in ``[0, 1]`` (``1.0`` for ``noise_multiplier = 0``).

    Raises:
      ValueError: everything :func:`check` raises, a bad ``target_epsilon``, or noise too small
        for the PLD construction.

    Example:
      >>> m = Mechanism("gaussian", 1.28, 1000, "poisson", 6000, 128)
      >>> bool(delta_for(m, epsilon(m, 1e-5)) <= 1.01e-5)
      True
    """
    _check_fields(m, "delta_for")
    _check_epsilon(target_epsilon, "delta_for")
    _check_support(m, accountant, "delta_for")
    if m.noise_multiplier == 0:
        return 1.0
    acc = _composed(m, accountant, "delta_for")
    try:
        return float(min(1.0, acc.get_delta(float(target_epsilon))))
    except _PLD_ERRORS as err:
        _too_small(m, accountant, "delta_for", err)


# ------------------------------------------------------------------------------------------------
# Calibration.

_MAX_DOUBLINGS = 40     # z up to 2^40: beyond, the target is unreachable in practice
_MIN_NOISE = 1e-4       # below, the target needs (almost) no noise


def _bracket(gap, fn: str):
    """``(lo, hi)`` with ``gap(lo) > 0 >= gap(hi)`` and ``hi <= 2 lo``, searched from ``z = 1``;
    ``gap`` is ``None`` where the accountant cannot evaluate (too little noise: a huge ε)."""

    def computable(lo, hi):                 # gap(lo) is None: move lo up towards hi
        for _ in range(20):
            mid = math.sqrt(lo * hi)
            value = gap(mid)
            if value is None:
                lo = mid
            elif value > 0:
                return mid, hi
            else:
                hi = mid
        _fail(fn, f"the accountant cannot evaluate the noise just below noise_multiplier="
              f"{hi:g}; change the target or use accountant='rdp'.")

    z = 1.0
    value = gap(z)
    if value is None or value > 0:          # too little noise: double
        for _ in range(_MAX_DOUBLINGS):
            lo, lo_value, z = z, value, 2 * z
            value = gap(z)
            if value is not None and value <= 0:
                return (lo, z) if lo_value is not None else computable(lo, z)
        _fail(fn, f"no noise_multiplier up to {z:g} reaches the target; raise "
              "target_epsilon or delta.")
    while True:                             # enough noise: halve until it is not
        hi, z = z, z / 2
        if z < _MIN_NOISE:
            _fail(fn, f"the target is met with noise_multiplier < {_MIN_NOISE:g}: it asks for "
                  "no meaningful privacy. Lower target_epsilon.")
        value = gap(z)
        if value is None:
            return computable(z, hi)
        if value > 0:
            return z, hi


def calibrate(m: Mechanism, target_epsilon: float, delta: float, accountant: str = "pld") -> float:
    """The smallest noise multiplier ``z`` with ``epsilon(m with z, delta) <= target_epsilon``.

    ``m.noise_multiplier`` is ignored. The root is bracketed by doubling or halving ``z`` from 1
    (so the accountant is never asked about the tiny noise levels where the PLD is slow or
    overflows), then found by ``dp_accounting.calibrate_dp_mechanism`` (Brent's method, relative
    tolerance 1e-5) on that bracket, with the PLD grid fixed at :func:`pld_interval` of the
    bracket's midpoint; a PLD result is then checked with :func:`epsilon` (whose grid follows
    ``z``) and raised by a few 1e-4 relative if needed. So ``epsilon(m with z) <=
    target_epsilon`` always holds, within about 0.2 % (PLD) or 1e-5 (RDP) of it.

    Args:
      m: the worker's :class:`Mechanism` (any ``noise_multiplier``).
      target_epsilon: a finite ε > 0.
      delta: in ``(0, 1)``.
      accountant: ``"pld"`` or ``"rdp"``.

    Returns:
      ``z`` as a float > 0. The noise on a batch mean of clip ``C`` is then ``b = z C / B``
      (Gaussian, add-or-remove-one; ``2 z C / B`` under replace-one).

    Raises:
      ValueError: everything :func:`check` raises (bar the noise multiplier), a bad target or
        delta, or a search that cannot bracket the target (the message says which way to move).

    Example:
      >>> m = Mechanism("gaussian", 0.0, 10_000, "poisson", 6000, 128)
      >>> z = calibrate(m, 1.0, 1e-5, "rdp")
      >>> round(z, 2), bool(epsilon(m._replace(noise_multiplier=z), 1e-5, "rdp") <= 1.0)
      (8.68, True)
    """
    fn = "calibrate"
    probe = m._replace(noise_multiplier=1.0)
    _check_fields(probe, fn)
    _check_epsilon(target_epsilon, fn)
    _check_delta(delta, fn)
    _check_support(probe, accountant, fn)
    dp = _dp()
    target, delta = float(target_epsilon), float(delta)

    def at(z: float) -> Mechanism:
        return m._replace(noise_multiplier=float(z))

    def gap(z: float):
        try:
            return epsilon(at(z), delta, accountant) - target
        except ValueError:                      # the PLD's "noise too small"
            return None

    lo, hi = _bracket(gap, fn)
    if accountant == "pld":     # one grid for the whole search; widened for the grid's change
        interval = pld_interval(at(math.sqrt(lo * hi)))
        lo, hi = 0.95 * lo, 1.05 * hi
    else:
        interval = None
    try:
        z = float(dp.calibrate_dp_mechanism(
            lambda: _accountant(probe, accountant, interval),
            lambda x: dp_event(at(x)), target, delta,
            bracket_interval=dp.ExplicitBracketInterval(lo, hi), tol=1e-5 * lo))
    except (ValueError, RuntimeError, *_PLD_ERRORS) as err:
        _fail(fn, f"dp_accounting.calibrate_dp_mechanism found no noise multiplier in "
              f"[{lo:g}, {hi:g}] for target_epsilon={target} at delta={delta} "
              f"({type(err).__name__}: {err}); try accountant='rdp' or another target.")
    if accountant == "rdp":     # the same accountant as epsilon(): already <= target
        return z
    step = 1e-4
    value = gap(z)
    while value is None or value > 0:           # epsilon()'s grid follows z: make it hold there
        if z > hi:
            _fail(fn, f"the calibrated noise z={z:g} does not meet target_epsilon={target}; "
                  "try accountant='rdp'.")
        z *= 1 + step
        step *= 2
        value = gap(z)
    return z


__all__ = ("ACCOUNTANTS", "NOISES", "PLD_DISCRETIZATION", "PLD_INTERVAL_BOUNDS", "PLD_MAX_POINTS",
           "SAMPLINGS", "Mechanism", "calibrate", "check", "delta_for", "dp_event", "epsilon",
           "pld_interval", "relation")
