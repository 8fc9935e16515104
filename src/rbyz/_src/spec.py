"""Rule declarations: what an aggregator, pre-aggregator or attack is, stated once.

Every registered rule carries one :class:`Spec`: its name and kind, whether it needs a random
key, the state it keeps between steps (and how it starts), whether it can run on a slice of the
coordinates, its constraint on ``n`` and ``f``, its hyperparameters with their defaults, its
references and its cost. Transforms, :func:`rbyz.preaggregators.compose`, the demo, the
benchmarks and the tests read the declaration; nothing inspects parameter names at call time.

A rule is declared with :func:`declare`, which reads the function's keyword parameters once, checks
them against what is declared (a declared key or state argument must exist), attaches the spec as
``fn.spec`` and returns the function unchanged, so that it stays a plain function (doctests,
``functools.partial`` and ``jax.jit`` see no wrapper). An undeclared function still works as a
stateless, keyless rule (:func:`spec_of`).

Stateful rules have explicit state, as optax does: ``spec.init(params)`` gives the state before the
first step and ``spec.apply(updates, state, key, hparams)`` returns ``(output, new_state)``. The
pure function itself takes the state as a keyword (centered clipping's ``center``) and returns the
output only. A state whose shape depends on the hyperparameters (FoolsGold's one history row per
worker) is declared ``init_takes_hparams`` and started by ``spec.init(params, hparams)``.

Example:
  >>> import jax.numpy as jnp
  >>> from rbyz._src import spec
  >>> @spec.declare("aggregator", register=False, constraint=spec.MAJORITY, cost="O(n d)")
  ... def half_sum(updates, *, f: int = 0, scale: float = 0.5):
  ...     return scale * updates.sum(0)
  >>> half_sum.spec.hparams
  {'f': 0, 'scale': 0.5}
  >>> half_sum.spec.check_hparams({"scael": 1.0}, "aggregate")
  Traceback (most recent call last):
  ...
  ValueError: aggregate: half_sum has no hyperparameter 'scael'; it accepts f, scale.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

KINDS = ("aggregator", "preaggregator", "attack")
KNOWLEDGE = ("honest", "own", "shapes")


class _Required:
    """The default of a hyperparameter that has none (it must be given)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


# ------------------------------------------------------------------------------------------------
# Parts of a declaration.


@dataclasses.dataclass(frozen=True)
class Reference:
    """A publication a rule comes from: ``Reference("Blanchard, ...", "Machine learning ...",
    "NeurIPS", 2017)``."""

    authors: str
    title: str
    venue: str
    year: int

    def __str__(self) -> str:
        return f"{self.authors}, `{self.title}`, {self.venue} {self.year}"


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A requirement on the worker count ``n`` and the Byzantine count ``f``.

    Attributes:
      text: the requirement as a person reads it, e.g. ``"n > 2f"``.
      holds: ``holds(n, f) -> bool``.
      advice: how to fix a violation, appended to the message.
      explainer: a custom ``explain`` (compositions, where each stage checks its own ``f``).
    """

    text: str
    holds: Callable[[int, int], bool]
    advice: str = "Use more workers or assume fewer Byzantine ones."
    explainer: Callable[[int, int], str | None] | None = None

    def explain(self, n: int, f: int) -> str | None:
        """``None`` when ``(n, f)`` satisfies the constraint, else what is wrong and how to fix it."""
        if self.explainer is not None:
            return self.explainer(n, f)
        if self.holds(n, f):
            return None
        return f"needs {self.text}; got n={n}, f={f}. {self.advice}"


ANY = Constraint("n >= 1", lambda n, f: n >= 1)
MINORITY = Constraint("0 <= f < n", lambda n, f: 0 <= f < n)
MAJORITY = Constraint("n > 2f", lambda n, f: n > 2 * f)
KRUM = Constraint("n >= 2f + 3", lambda n, f: n >= 2 * f + 3)
BULYAN = Constraint("n >= 4f + 3", lambda n, f: n >= 4 * f + 3)


def zeros_like_params(params):
    """State init of rules whose state is one worker's update, starting at zero."""
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)


def _previous_output(output, state):
    del state
    return output


@dataclasses.dataclass(frozen=True)
class State:
    """What a stateful rule keeps between steps.

    Attributes:
      arg: the keyword the pure function takes the state as (centered clipping: ``"center"``).
      init: ``init(params) -> state`` before the first step (params: one worker's update shape);
        ``init(params, hparams)`` when ``init_takes_hparams``.
      next: ``next(output, state) -> new state``; by default the rule's own output.
      model_shaped: whether the state is a pytree shaped like one worker's update (then the
        ``layout="coordinates"`` mode can cut it into coordinate slices like the updates).
      doc: what the state is, for ``rbyz list`` and error messages.
      init_takes_hparams: whether ``init`` also receives the rule's hyperparameters (declared
        defaults filled in), for a state whose shape depends on them (FoolsGold keeps one
        history row per worker, so its ``init`` needs their number).
      rows: for a state with one row per worker, the hyperparameter that gives their number
        (FoolsGold: ``"num_clients"``); harnesses set it to the rows the rule aggregates.
    """

    arg: str
    init: Callable[..., Any] = zeros_like_params
    next: Callable[[Any, Any], Any] = _previous_output
    model_shaped: bool = True
    doc: str = "the previous output"
    init_takes_hparams: bool = False
    rows: str | None = None


# ------------------------------------------------------------------------------------------------
# The declaration.


@dataclasses.dataclass(frozen=True)
class Spec:
    """The declaration of one rule. Build it with :func:`declare`; read it with :func:`spec_of`.

    Attributes:
      name: the public (registry) name.
      kind: ``"aggregator"``, ``"preaggregator"`` or ``"attack"``.
      fn: the pure function.
      key: whether the rule needs a random key (passed as ``key=``).
      state: what it keeps between steps, or ``None``.
      coordinate_slices: whether it gives the right result on a slice of the coordinates (every
        reduction over coordinates it makes goes through ``rbyz._src.reductions``).
      constraint: its requirement on ``n`` and ``f``.
      hparams: hyperparameter name -> default (:data:`REQUIRED` when it has none); ``None`` for
        an undeclared function (unknown: not validated).
      reference: the publications it comes from.
      cost: its cost in ``n`` and ``d``, e.g. ``"O(n^2 d)"``.
      rows_out: pre-aggregators: ``rows_out(n, hparams) -> n'``, the rows the next stage sees.
      takes_n: attacks: whether the total worker count is passed as ``n=``.
      weights: aggregators: whether the rule accepts per-worker weights (``weights=``, a
        non-negative ``[n]`` array such as the clients' sample counts). Like the key and the
        state, weights are a per-step input (traced, may change every step), not a static
        hyperparameter: :meth:`apply` passes them, and refuses them for a rule that does not
        declare ``weights=True``.
      reports: aggregators: whether the rule can report, in the same pass, the weight each row
        has in its output (``report=True`` makes it return ``(output, Selection)``, see
        ``rbyz.aggregators.Selection``): which rows it kept and with what weight.
      knowledge: attacks: what rows the attack is defined on, ``"honest"`` (the honest workers'
        updates: omniscient), ``"own"`` (the Byzantine workers' own honest updates, e.g. the
        reversed gradient) or ``"shapes"`` (nothing but shapes); the injection path gives it
        those rows unless told otherwise.
      note: where a default differs from the paper, which source it follows and why.
      declared: ``False`` for the default spec of an undeclared function.
      applier: a custom ``apply`` (compositions, FoolsGold), ``applier(updates, state, key,
        hparams) -> (output, new_state)``; a rule declared ``reports=True`` also takes
        ``report=True`` and then returns ``(output, new_state, selection)``. ``None`` uses the
        function.
    """

    name: str
    kind: str
    fn: Callable
    key: bool = False
    state: State | None = None
    coordinate_slices: bool = False
    constraint: Constraint = ANY
    hparams: Mapping[str, Any] | None = None
    reference: tuple[Reference, ...] = ()
    cost: str = "unknown"
    rows_out: Callable[[int, Mapping[str, Any]], int] | None = None
    takes_n: bool = False
    weights: bool = False
    reports: bool = False
    knowledge: str = "honest"
    note: str = ""
    declared: bool = True
    applier: Callable | None = dataclasses.field(default=None, repr=False)

    # -- validation, before any compute ---------------------------------------------------------

    def check_hparams(self, hparams: Mapping[str, Any], where: str, *,
                      complete: bool = True) -> dict:
        """Validates hyperparameter names: unknown ones, and (``complete``) missing required ones.

        Returns the hyperparameters with the declared defaults filled in (only the given ones
        when the spec is undeclared). Raises ``ValueError`` naming ``where``, the rule, the
        offending keyword and the accepted ones.
        """
        hparams = dict(hparams)
        if self.hparams is None:
            _bindable(self.fn, hparams, where, self.name)
            return hparams
        reserved = {"key"} | ({self.state.arg} if self.state else set())
        reserved |= {"n"} if self.takes_n else set()
        accepted = ", ".join(self.hparams) or "none"
        for name in hparams:
            if name == "weights" and self.weights:
                raise ValueError(
                    f"{where}: {self.name}'s weights are a per-step input, not a hyperparameter: "
                    "pass them at each step (spec.apply(..., weights=w), or "
                    "update(..., weights=w) of rbyz.transforms.aggregate)."
                )
            if name == "weights" and name not in self.hparams:
                raise ValueError(weights_refused(self.name, where))
            if name == "report" and name not in self.hparams:
                if not self.reports:
                    raise ValueError(report_refused(self.name, where))
                raise ValueError(
                    f"{where}: report is not a hyperparameter of {self.name}: ask for its "
                    "selection through spec.apply(..., report=True) or "
                    "rbyz.transforms.aggregate(..., report=True, num_workers=n).")
            if name in reserved:
                raise ValueError(
                    f"{where}: {self.name}'s {name!r} is supplied by rbyz, not set by hand"
                    + (f" (pass key=... to {where} itself)." if name == "key" else ".")
                )
            if name not in self.hparams:
                raise ValueError(
                    f"{where}: {self.name} has no hyperparameter {name!r}; it accepts {accepted}."
                )
        if complete:
            missing = [k for k, v in self.hparams.items()
                       if v is REQUIRED and k not in hparams and not (self.kind == "attack"
                                                                      and k == "f")]
            if missing:
                raise ValueError(
                    f"{where}: {self.name} needs {', '.join(f'{m}=...' for m in missing)}"
                    f"{' (the number of Byzantine workers assumed)' if 'f' in missing else ''}; "
                    f"it accepts {accepted}."
                )
        full = {k: v for k, v in (self.hparams or {}).items() if v is not REQUIRED}
        full.update(hparams)
        return full

    def check(self, n: int, f: int, where: str | None = None) -> None:
        """Raises ``ValueError("<rule>: needs ...; got n=.., f=..")`` when ``(n, f)`` violate the
        constraint."""
        problem = self.constraint.explain(n, f)
        if problem is not None:
            prefix = f"{where}: {self.name}" if where and where != self.name else self.name
            raise ValueError(f"{prefix}: {problem}")

    # -- running ---------------------------------------------------------------------------------

    def init(self, params, hparams: Mapping[str, Any] | None = None):
        """The state before the first step (``None`` for stateless rules).

        ``hparams``: the rule's hyperparameters, for a state declared ``init_takes_hparams``
        (its shape depends on them); the declared defaults fill in the ones not given. Other
        rules ignore them.
        """
        if self.state is None:
            return None
        if not self.state.init_takes_hparams:
            return self.state.init(params)
        full = {k: v for k, v in (self.hparams or {}).items() if v is not REQUIRED}
        full.update(hparams or {})
        return self.state.init(params, full)

    def apply(self, updates, state, key, hparams: Mapping[str, Any], weights=None,
              report: bool = False):
        """``(output, new_state)`` for one step; ``key`` is a typed key (or ``None`` if keyless).

        ``weights``: per-worker weights ``[n]`` for a rule declared ``weights=True``; ``None``
        runs the unweighted rule. Weights given to any other rule raise ``ValueError`` naming
        the rules that accept them. ``report=True`` (rules declared ``reports=True``) returns
        ``(output, new_state, selection)``, the selection computed in the same pass.
        """
        if weights is not None and not self.weights:
            raise ValueError(weights_refused(self.name, "apply"))
        if report and not self.reports:
            raise ValueError(report_refused(self.name, "apply"))
        if self.applier is not None:
            # A custom apply of a reporting rule takes report=True and returns the selection.
            if report:
                return self.applier(updates, state, key, hparams, report=True)
            return self.applier(updates, state, key, hparams)
        kwargs = dict(hparams)
        if self.key:
            kwargs["key"] = key
        if self.state is not None:
            kwargs[self.state.arg] = state
        if weights is not None:
            kwargs["weights"] = weights
        if report:
            out, selection = self.fn(updates, report=True, **kwargs)
            return out, (None if self.state is None else self.state.next(out, state)), selection
        out = self.fn(updates, **kwargs)
        return out, (None if self.state is None else self.state.next(out, state))

    def output_rows(self, n: int, hparams: Mapping[str, Any]) -> int:
        """Rows after this stage: ``n`` for aggregation-preserving stages, ``rows_out`` otherwise."""
        return n if self.rows_out is None else self.rows_out(n, hparams)

    # -- description -----------------------------------------------------------------------------

    def summary(self) -> dict[str, str]:
        """One row of ``rbyz list``: name, constraint, key, state, slices, cost, reference."""
        return {
            "name": self.name,
            "kind": self.kind,
            "constraint": self.constraint.text,
            "key": "yes" if self.key else "no",
            "state": self.state.doc if self.state else "-",
            "coordinate slices": "yes" if self.coordinate_slices else "no",
            **({"weights": "yes" if self.weights else "no",
                "reports": "yes" if self.reports else "no"} if self.kind == "aggregator"
               else {}),
            "cost": self.cost,
            **({"knowledge": self.knowledge} if self.kind == "attack" else {}),
            "hyperparameters": ", ".join(
                k if v is REQUIRED else f"{k}={v!r}" for k, v in (self.hparams or {}).items()),
            "reference": "; ".join(str(r) for r in self.reference),
        }


def report_refused(name: str, where: str) -> str:
    """The message for report=True given to a rule that does not declare ``reports=True``."""
    reporting = [s.name for s in REGISTRIES["aggregator"].specs() if s.reports]
    prefix = f"{where}: {name}" if where != name else name
    return (f"{prefix} cannot report which rows it kept (it is not declared reports=True; a "
            f"coordinate-wise rule keeps different rows in each coordinate); the rules that "
            f"report are {', '.join(reporting) or 'none'}. Drop report, or use one of those "
            "rules.")


def weights_refused(name: str, where: str) -> str:
    """The message for weights given to a rule that does not declare ``weights=True``."""
    accepting = [s.name for s in REGISTRIES["aggregator"].specs() if s.weights]
    prefix = f"{where}: {name}" if where and where != name else name
    return (f"{prefix} takes no per-worker weights; the rules that accept weights= are "
            f"{', '.join(accepting) or 'none'}. Drop weights, or use one of those rules.")


def _bindable(fn: Callable, hparams: Mapping[str, Any], where: str, name: str) -> None:
    """An undeclared function: best effort, its signature must accept the keywords given."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return
    try:
        signature.bind_partial(None, **hparams)
    except TypeError as err:
        raise ValueError(f"{where}: {name} does not accept {sorted(hparams)}: {err}.") from None


# ------------------------------------------------------------------------------------------------
# Registries (one per kind) and declaring.


class Registry:
    """Name -> declared rule, for configs, the command line and the registry-driven tests."""

    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, Spec] = {}

    def add(self, spec: Spec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"{self.kind} registry: {spec.name!r} is already registered.")
        self._specs[spec.name] = spec

    def spec(self, name: str) -> Spec:
        """The declaration registered as ``name``; ``ValueError`` listing the known names."""
        try:
            return self._specs[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}."
            ) from None

    def get(self, name: str) -> Callable:
        """The function registered as ``name``."""
        return self.spec(name).fn

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._specs))

    def specs(self) -> tuple[Spec, ...]:
        return tuple(self._specs[name] for name in self.names())


REGISTRIES = {kind: Registry(kind) for kind in KINDS}


def declare(kind: str, *, name: str | None = None, key: bool = False, state: State | None = None,
            coordinate_slices: bool = False, constraint: Constraint = ANY,
            reference: tuple[Reference, ...] | Reference = (), cost: str = "unknown",
            rows_out: Callable | None = None, takes_n: bool = False, knowledge: str = "honest",
            note: str = "", register: bool = True,
            weights: bool = False, reports: bool = False) -> Callable[[Callable], Callable]:
    """Decorator declaring a rule: attaches ``fn.spec`` and (``register``) adds it to its registry.

    The hyperparameters and their defaults are read from the function's keyword parameters once,
    here (all but the first positional one, ``key`` and the state argument); a declared ``key`` or
    ``state`` must be a parameter of the function, else ``TypeError`` at import.

    Args:
      kind: ``"aggregator"``, ``"preaggregator"`` or ``"attack"``.
      name: registry name (default: the function's ``__name__``).
      key: whether the rule needs a random key.
      state: what it keeps between steps (:class:`State`), or ``None``.
      coordinate_slices: whether it runs on a slice of the coordinates (see :class:`Spec`).
      constraint: its requirement on ``n`` and ``f``.
      reference: one :class:`Reference` or a tuple of them.
      cost: its cost in ``n`` and ``d``.
      rows_out: pre-aggregators that change the row count: ``rows_out(n, hparams)``.
      takes_n: attacks that need the total worker count ``n``.
      weights: aggregators that accept per-worker weights as ``weights=`` (a per-step input,
        like the key: not a hyperparameter).
      reports: aggregators that return ``(output, Selection)`` when called with ``report=True``
        (a static flag, not a hyperparameter).
      knowledge: attacks: ``"honest"``, ``"own"`` or ``"shapes"`` (see :class:`Spec`).
      note: where a default differs from the paper, which source it follows and why.
      register: add to the registry of ``kind`` (set ``False`` for a user's own rule).

    Example:
      >>> import jax
      >>> from rbyz._src import spec
      >>> @spec.declare("aggregator", register=False, coordinate_slices=True)
      ... def lower_half_mean(updates, *, f: int = 0):
      ...     return jax.tree.map(lambda u: u.sort(0)[: u.shape[0] // 2 + 1].mean(0), updates)
      >>> spec.spec_of(lower_half_mean).coordinate_slices
      True
    """
    if kind not in KINDS:
        raise ValueError(f"declare: kind must be one of {', '.join(KINDS)}; got {kind!r}.")
    if knowledge not in KNOWLEDGE:
        raise ValueError(f"declare: knowledge must be one of {', '.join(KNOWLEDGE)}; got "
                         f"{knowledge!r}.")
    references = (reference,) if isinstance(reference, Reference) else tuple(reference)

    def attach(fn: Callable) -> Callable:
        rule_name = name or fn.__name__
        params = list(inspect.signature(fn).parameters.values())[1:]
        names = {p.name for p in params}
        for needed, why in ((key and "key", "key=True"), (state and state.arg, "its state"),
                            (takes_n and "n", "takes_n=True"), (weights and "weights",
                                                                "weights=True"),
                            (reports and "report", "reports=True")):
            if needed and needed not in names:
                raise TypeError(f"declare: {rule_name} declares {why} but has no {needed!r} "
                                "parameter.")
        if not key and "key" in names:
            raise TypeError(f"declare: {rule_name} has a 'key' parameter; declare key=True.")
        if state is not None and state.rows is not None and (
                state.rows not in names or not state.init_takes_hparams):
            raise TypeError(f"declare: {rule_name}'s state is sized by {state.rows!r}, which "
                            "must be a parameter of the function read by an init declared "
                            "init_takes_hparams=True.")
        skipped = {"key"} | ({state.arg} if state else set()) | ({"n"} if takes_n else set())
        skipped |= {"weights"} if weights else set()
        skipped |= {"report"} if reports else set()
        hparams = {
            p.name: (REQUIRED if p.default is inspect.Parameter.empty else p.default)
            for p in params
            if p.name not in skipped and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        declared = Spec(
            name=rule_name, kind=kind, fn=fn, key=key, state=state,
            coordinate_slices=coordinate_slices, constraint=constraint, hparams=hparams,
            reference=references, cost=cost, rows_out=rows_out, takes_n=takes_n,
            weights=weights, reports=reports, knowledge=knowledge, note=note,
        )
        fn.spec = declared
        if register:
            REGISTRIES[kind].add(declared)
        return fn

    return attach


def spec_of(rule: Callable, kind: str = "aggregator") -> Spec:
    """The declaration of ``rule`` (a declared function, a ``functools.partial`` of one, or a
    plain function, which counts as a stateless, keyless rule that cannot run on slices)."""
    fn = rule
    while isinstance(fn, functools.partial):
        fn = fn.func
    declared = getattr(fn, "spec", None)
    if isinstance(declared, Spec):
        return declared
    return Spec(name=getattr(fn, "__name__", type(fn).__name__), kind=kind, fn=fn,
                declared=False)


def resolve(rule: Callable | str, kind: str, where: str) -> tuple[Spec, dict]:
    """``(spec, bound hyperparameters)`` for a registry name, a function or a partial of one.

    Keywords bound with ``functools.partial`` count as hyperparameters (checked by the caller
    with :meth:`Spec.check_hparams`); positional arguments bound by a partial are refused.
    """
    if isinstance(rule, str):
        return REGISTRIES[kind].spec(rule), {}
    if not callable(rule):
        raise ValueError(f"{where}: expects a {kind} function or a registered name "
                         f"({', '.join(REGISTRIES[kind].names())}); got {rule!r}.")
    bound: dict = {}
    fn = rule
    while isinstance(fn, functools.partial):
        if fn.args:
            raise ValueError(f"{where}: bind hyperparameters by keyword, e.g. "
                             f"functools.partial(rule, f=1); got positional {fn.args!r}.")
        bound = {**fn.keywords, **bound}
        fn = fn.func
    declared = spec_of(fn, kind)
    if not declared.declared and bound:
        declared = dataclasses.replace(declared, fn=rule)
        bound = {}
    return declared, bound


def registry_view(kind: str) -> types.SimpleNamespace:
    """The public registry API of one kind, for the public packages: ``get`` (name -> rule),
    ``names``, ``spec`` (name -> declaration), ``specs`` and ``declare`` (a user's own rule of
    this kind, not registered unless ``register=True``)."""
    registry = REGISTRIES[kind]
    return types.SimpleNamespace(get=registry.get, names=registry.names, spec=registry.spec,
                                 specs=registry.specs,
                                 declare=functools.partial(declare, kind, register=False))
