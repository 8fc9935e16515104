"""One object for what runs and what is accounted: the batches, the clipping, the noise, the ε.

A :class:`PrivacyPlan` fixes, for every worker ``i`` of a run (its ``N_i`` records), how its
batch is drawn each step (:meth:`PrivacyPlan.sample`), how its gradient is clipped
(:meth:`PrivacyPlan.grad_fn`), the noise it adds before its update leaves it
(:meth:`PrivacyPlan.worker_noise`), and the privacy this buys (:meth:`PrivacyPlan.epsilons`,
through :mod:`rbyz.privacy.accounting`). The sampler and the accountant read the same fields, so
the sampling the accountant assumes is the sampling that ran (jax_privacy's ``DPExecutionPlan``
is the model).

Per worker and step the release is ``g_i + b xi_i`` with ``g_i`` the per-example clipped
gradient divided by the public normaliser (:mod:`rbyz.privacy.clipping`) and ``b``
(:attr:`PrivacyPlan.stddev`, Chen et al.'s ``b``) the noise's std (Gaussian) or scale
(Laplace). Its noise multiplier, what the accountant needs, is ``z_i = b / s_i`` with ``s_i``
the sensitivity:

==========================  ===============  =======================  =====================
sampling                    batch            neighbouring relation    sensitivity ``s_i``
==========================  ===============  =======================  =====================
``"poisson"``               ``B`` expected   add or remove one        ``C / B``
``"without_replacement"``   ``B`` exactly    replace one              ``2 C / B``
``"full"``                  all ``N_i``      add or remove one        ``C / N_i``
==========================  ===============  =======================  =====================

Poisson batches have a random size; the compiled step holds a static :attr:`capacity` of
examples, and a draw larger than it keeps a random subset of that size: truncated Poisson
sampling, which the accountant composes exactly (``TruncatedSubsampledGaussianDpEvent``, PLD).
The default capacity, ``B + 5 sqrt(B)``, costs nothing in ε: measured (PLD, δ = 1e-5, ``N = 6000``,
``z = 1.28``), ``B = 128``, ``T = 600``: ε 2.611 truncated at ``B + 3 sqrt(B)``, 2.082 at
``B + 4 sqrt(B)``, 2.067 at ``B + 5 sqrt(B)``, 2.066 untruncated (``B = 64``: 1.532, 0.987,
0.968, 0.967), for 1.6-1.8 times the per-example gradients of ``B`` slots.
Laplace noise and the RDP accountant have no truncated event, so with them the capacity is the
whole shard (no truncation; every step then takes the per-example gradients of ``N_i`` slots,
most of them masked).

With ``at = "server"`` (a trusted server adds the noise once, after the mean) one record moves
the mean of the ``n`` workers' releases by ``s_i / n``; only the mean has that sensitivity
(:func:`rbyz.privacy.central_noise` refuses any other rule).

Example:
  >>> plan = PrivacyPlan(clip=1.0, batch_size=128, dataset_sizes=(6000,) * 4, steps=1000,
  ...                    stddev=0.01)
  >>> float(plan.sensitivities()[0]), round(float(plan.noise_multipliers()[0]), 2), plan.capacity
  (0.0078125, 1.28, 185)
  >>> round(plan.epsilon(), 1)  # at δ = 1e-5, PLD, truncated at 185: the untruncated ε
  2.7
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz.privacy import accounting
from rbyz.privacy.clipping import NORMS, ClippedGrad, clipped_grad

PLACES = ("worker", "server")


def _fail(field: str, message: str):
    raise ValueError(f"PrivacyPlan: {field}: {message}")


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """How every worker's batches, clipping and noise run, and what they are accounted as.

    Attributes:
      clip: ``C``, the bound on each example's gradient norm (``> 0``).
      batch_size: ``B``: the expected batch (``"poisson"``), the exact batch
        (``"without_replacement"``); unused with ``"full"``.
      dataset_sizes: ``N_i`` for every worker (its records; disjoint over the workers).
      steps: ``T``, the releases of the whole run.
      sampling: ``"poisson"``, ``"without_replacement"`` or ``"full"``.
      noise: ``"gaussian"`` or ``"laplace"`` (Laplace needs ``norm = "l1"``).
      stddev: ``b``, the noise's std (Gaussian) or scale (Laplace) on each worker's clipped
        mean; ``0``: no noise (ε = ∞). :meth:`with_noise_multiplier` and :meth:`with_epsilon`
        set it from a noise multiplier or a target ε.
      max_batch: Poisson only: the static capacity of a step's batch (``0``: ``ceil(B + 5
        sqrt(B))`` for Gaussian noise, the whole shard for Laplace noise or the RDP accountant).
      norm: the clipping's norm, ``"l2"`` or ``"l1"``.
      delta: the δ of the reported ε, in ``(0, 1)``.
      accountant: ``"pld"`` or ``"rdp"``.
      at: ``"worker"`` (each worker adds its noise: local DP against the server and every other
        worker) or ``"server"`` (a trusted server adds it once to the mean).
    """

    clip: float
    batch_size: int
    dataset_sizes: tuple[int, ...]
    steps: int
    sampling: str = "poisson"
    noise: str = "gaussian"
    stddev: float = 0.0
    max_batch: int = 0
    norm: str = "l2"
    delta: float = 1e-5
    accountant: str = "pld"
    at: str = "worker"

    def __post_init__(self):
        object.__setattr__(self, "dataset_sizes", tuple(int(n) for n in self.dataset_sizes))
        if not (_is_number(self.clip) and math.isfinite(self.clip) and self.clip > 0):
            _fail("clip", f"must be a finite number > 0 (each example's gradient norm bound, "
                          f"e.g. 1.0); got {self.clip!r}.")
        if not (_is_number(self.stddev) and math.isfinite(self.stddev) and self.stddev >= 0):
            _fail("stddev", f"the noise's std must be a finite number >= 0; got "
                            f"{self.stddev!r}.")
        if not (_is_number(self.delta) and 0 < self.delta < 1):
            _fail("delta", f"must be in (0, 1), e.g. 1e-5 (well below 1 / records); got "
                           f"{self.delta!r}.")
        if self.sampling not in accounting.SAMPLINGS:
            _fail("sampling", f"must be one of {', '.join(accounting.SAMPLINGS)}; got "
                              f"{self.sampling!r}.")
        if self.noise not in accounting.NOISES:
            _fail("noise", f"must be one of {', '.join(accounting.NOISES)}; got {self.noise!r}.")
        if self.norm not in NORMS:
            _fail("norm", f"must be one of {', '.join(NORMS)}; got {self.norm!r}.")
        if self.noise == "laplace" and self.norm != "l1":
            _fail("norm", "Laplace noise is calibrated to the L1 sensitivity, which an L2 clip "
                          "bounds only by sqrt(d) C; clip in L1 (norm = 'l1') or use Gaussian "
                          "noise.")
        if self.at not in PLACES:
            _fail("at", f"must be 'worker' or 'server'; got {self.at!r}.")
        if self.accountant not in accounting.ACCOUNTANTS:
            _fail("accountant", f"must be one of {', '.join(accounting.ACCOUNTANTS)}; got "
                                f"{self.accountant!r}.")
        if not self.dataset_sizes or min(self.dataset_sizes) < 1:
            _fail("dataset_sizes", f"every worker needs >= 1 record; got {self.dataset_sizes}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            _fail("steps", f"must be an integer >= 1; got {self.steps!r}.")
        if self.sampling != "full":
            if (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                    or self.batch_size < 1):
                _fail("batch_size", f"{self.sampling} sampling needs a batch of >= 1 records "
                                    f"(or sampling = 'full'); got {self.batch_size!r}.")
            smallest = min(self.dataset_sizes)
            if self.batch_size > smallest:
                worker = self.dataset_sizes.index(smallest)
                _fail("batch_size", f"a batch of {self.batch_size} is larger than worker "
                                    f"{worker}'s data ({smallest} records); use a batch <= "
                                    f"{smallest} or fewer workers.")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or \
                self.max_batch < 0:
            _fail("max_batch", f"must be an integer >= 0 (0: the default capacity); got "
                               f"{self.max_batch!r}.")
        if self.max_batch and self.sampling != "poisson":
            _fail("max_batch", f"is the capacity of Poisson batches; {self.sampling} batches "
                               f"have a fixed size (set max_batch = 0).")
        for i in range(len(self.dataset_sizes)):  # every accounting setting, before any compute
            accounting.check(self.mechanism(i), self.accountant)

    # --- sizes ----------------------------------------------------------------------------

    @property
    def num_workers(self) -> int:
        return len(self.dataset_sizes)

    @property
    def relation(self) -> str:
        """The neighbouring relation the ε is for (:func:`rbyz.privacy.accounting.relation`)."""
        return accounting.relation(self.sampling)

    @property
    def capacity(self) -> int:
        """The examples a compiled step holds per worker (Poisson batches truncated to it)."""
        largest = max(self.dataset_sizes)
        if self.sampling == "full":
            return largest
        if self.sampling == "without_replacement":
            return self.batch_size
        if self.max_batch:
            return min(self.max_batch, largest)
        if self.noise == "laplace" or self.accountant == "rdp":
            return largest  # no truncated event for them: never truncate
        return min(math.ceil(self.batch_size + 5 * math.sqrt(self.batch_size)), largest)

    def normalizers(self) -> np.ndarray:
        """Each worker's public divisor: ``B``, or ``N_i`` for a full batch."""
        if self.sampling == "full":
            return np.asarray(self.dataset_sizes, np.float64)
        return np.full(self.num_workers, float(self.batch_size))

    def sensitivities(self) -> np.ndarray:
        """How far one record of worker ``i`` moves what is noised (its release, or the mean
        with ``at = "server"``), in the clipping's norm."""
        factor = 2.0 if self.relation == "replace_one" else 1.0
        out = factor * self.clip / self.normalizers()
        return out / self.num_workers if self.at == "server" else out

    def noise_multipliers(self) -> np.ndarray:
        """``z_i = b / s_i`` per worker."""
        return self.stddev / self.sensitivities()

    # --- accounting -----------------------------------------------------------------------

    def mechanism(self, worker: int, steps: int | None = None) -> accounting.Mechanism:
        """Worker ``worker``'s release over ``steps`` (default: the run's) for the accountant."""
        size = self.dataset_sizes[worker]
        truncate = self.sampling == "poisson" and self.capacity < size
        return accounting.Mechanism(
            noise=self.noise, noise_multiplier=float(self.stddev / self.sensitivities()[worker]),
            steps=self.steps if steps is None else steps, sampling=self.sampling,
            dataset_size=size, batch_size=self.batch_size if self.sampling != "full" else size,
            max_batch=self.capacity if truncate else 0)

    def epsilons(self, steps: int | None = None) -> np.ndarray:
        """ε of every worker after ``steps`` releases (default: the run's) at :attr:`delta`;
        workers with the same mechanism are accounted once."""
        mechanisms = [self.mechanism(i, steps) for i in range(self.num_workers)]
        return np.array([_epsilon(m, self.delta, self.accountant) for m in mechanisms])

    def epsilon(self, steps: int | None = None, delta: float | None = None) -> float:
        """The run's guarantee for every record: the largest ε over the workers (a record's
        guarantee is its worker's, since the workers hold disjoint data)."""
        if delta is not None:
            return dataclasses.replace(self, delta=delta).epsilon(steps)
        return float(np.max(self.epsilons(steps)))

    def with_noise_multiplier(self, noise_multiplier: float) -> PrivacyPlan:
        """This plan with ``b = z max_i s_i``: every worker's noise multiplier at least ``z``."""
        if not (_is_number(noise_multiplier) and math.isfinite(noise_multiplier)
                and noise_multiplier >= 0):
            _fail("noise_multiplier", f"must be a finite number >= 0; got "
                                      f"{noise_multiplier!r}.")
        return dataclasses.replace(self, stddev=float(noise_multiplier
                                                      * np.max(self.sensitivities())))

    def with_epsilon(self, target_epsilon: float) -> PrivacyPlan:
        """This plan with the smallest ``b`` giving every worker ε <= ``target_epsilon`` at
        :attr:`delta` (:func:`rbyz.privacy.accounting.calibrate` per distinct worker)."""
        sens = self.sensitivities()
        needed = [_calibrate(self.mechanism(i), target_epsilon, self.delta, self.accountant)
                  * sens[i] for i in range(self.num_workers)]
        return dataclasses.replace(self, stddev=float(max(needed)))

    # --- what runs ------------------------------------------------------------------------

    def grad_fn(self, loss_fn: Callable, *, microbatch: int = 0) -> ClippedGrad:
        """One worker's per-example clipped gradient over a batch of :attr:`capacity` slots,
        divided by ``B`` (pass each worker's ``normalizers()[i]`` for a full batch)."""
        return clipped_grad(loss_fn, clip=self.clip, normalize_by=float(self.normalizers()[0]),
                            norm=self.norm, microbatch=microbatch)

    def sample(self, key, indices, sizes) -> tuple[jax.Array, jax.Array]:
        """Every worker's batch, as the accountant assumes it: ``(idx [n, capacity], mask [n,
        capacity])``, dataset indices and which slots hold real examples.

        ``indices [n, max_size]`` and ``sizes [n]`` are :class:`rbyz.sim.partition.Partition`'s
        (row ``i``'s first ``sizes[i]`` entries are worker ``i``'s records). Poisson: ``k_i ~
        Binomial(N_i, B / N_i)``, then the first ``min(k_i, capacity)`` of a uniformly random
        order of the worker's records (a uniformly random subset of that size: Poisson
        sampling, truncated); without replacement: the first ``B``; full: every record.
        """
        indices, sizes = jnp.asarray(indices), jnp.asarray(sizes)
        n, width = indices.shape
        if n != self.num_workers:
            raise ValueError(f"PrivacyPlan.sample: the plan has {self.num_workers} workers; "
                             f"got indices for {n}.")
        slots = jnp.arange(width)[None, :]
        own = slots < sizes[:, None]
        if self.sampling == "full":
            return indices, own
        k_order, k_count = jax.random.split(checks.as_key(key, "PrivacyPlan.sample"))
        scores = jnp.where(own, jax.random.uniform(k_order, (n, width)), 2.0)
        _, order = jax.lax.top_k(-scores, self.capacity)
        idx = jnp.take_along_axis(indices, order, axis=1)
        if self.sampling == "without_replacement":
            return idx, jnp.ones(idx.shape, jnp.bool_)
        rate = self.batch_size / sizes.astype(jnp.float32)
        count = jax.random.binomial(k_count, sizes.astype(jnp.float32), rate)
        mask = jnp.arange(self.capacity)[None, :] < count.astype(jnp.int32)[:, None]
        return idx, mask

    def worker_noise(self, *, key, axis_name: str | None = None, tiled: bool = False):
        """The noise every worker adds to its clipped gradient
        (:func:`rbyz.transforms.add_worker_noise` with ``b`` = :attr:`stddev`)."""
        from rbyz.transforms import add_worker_noise

        if self.at != "worker":
            raise ValueError("PrivacyPlan.worker_noise: this plan adds its noise at the server "
                             "(at = 'server'); use rbyz.privacy.central_noise.")
        return add_worker_noise(self.stddev, key=key, distribution=self.noise,
                                axis_name=axis_name, tiled=tiled)


@functools.lru_cache(maxsize=4096)
def _epsilon(mechanism: accounting.Mechanism, delta: float, accountant: str) -> float:
    return accounting.epsilon(mechanism, delta, accountant)


@functools.lru_cache(maxsize=1024)
def _calibrate(mechanism: accounting.Mechanism, target: float, delta: float,
               accountant: str) -> float:
    return accounting.calibrate(mechanism, target, delta, accountant)


__all__ = ("PLACES", "PrivacyPlan")
