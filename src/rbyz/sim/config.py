"""Experiments as data: dataclasses read from TOML, checked field by field, overridable.

An experiment is an :class:`Experiment` (sections ``data``, ``model``, ``workers``, ``attack``,
``defence``, ``train``, ``diagnostics``, ``parallel``, ``privacy``). It is read from a TOML file with
:func:`load` (parsed with ``tomllib``: data only, nothing evaluated), every key checked against
the dataclass fields (an unknown key or a wrong type is a ``ValueError`` naming the field), and
overridden from the command line with ``section.field=value`` strings (:func:`override`; the
value is read as a TOML value, so ``train.steps=200``, ``defence.pre=["nnm"]`` and
``defence.rule=krum`` all work).

A sweep (``rbyz sweep``) is the same file with a ``[sweep]`` table whose entries are grid axes:
a dotted field with a list of values (``seed = [0, 1, 2]``, ``"workers.f" = [3, 5]``), or a
section with a list of tables, each a set of that section's fields laid over the base section
(``attack = [{name = "none"}, {name = "alie"}, {name = "ipm", hparams = {epsilon = 0.1}}]``; a
table that names an attack or a rule starts from its defaults: the base's ``hparams`` and
``label`` are dropped), or any other name with a list of partial experiments, tables of sections
laid over the base together (``defence = [{defence = {rule = "centered_clipping"}, workers =
{momentum = 0.9}}, ...]`` under another name, e.g. ``defences``). The grid is the Cartesian
product of the axes, the last one varying fastest (:func:`expand`).

Example:
  >>> exp = from_dict({"workers": {"n": 10, "f": 2}, "defence": {"rule": "median"}})
  >>> exp.workers.n, exp.defence.rule, exp.attack.name
  (10, 'median', 'none')
  >>> override(exp, ["train.steps=50", "attack.name=alie"]).train.steps
  50
  >>> from_dict({"train": {"step": 5}})
  Traceback (most recent call last):
  ...
  ValueError: config: unknown key 'train.step'; train accepts steps, eval_every, lr, server_momentum, optimizer, checkpoint_every.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how the workers share them.

    Attributes:
      dataset: ``"auto"`` (Fashion-MNIST when installed, else scikit-learn's digits),
        ``"fashion_mnist"``, ``"mnist"``, ``"digits"`` or ``"synthetic"``.
      dir: a directory holding the IDX files (``""``: the search path of
        :func:`rbyz.sim.data.load`).
      partition: ``"iid"``, ``"dirichlet"``, ``"classes"``, ``"gamma"`` or ``"sorted"``
        (:func:`rbyz.sim.partition.partition`).
      alpha: Dirichlet concentration (``partition="dirichlet"``).
      classes_per_worker: classes held by each worker (``partition="classes"``).
      gamma: fraction distributed iid (``partition="gamma"``).
      batch_size: examples per worker per step (``0``: full batch, every worker's whole
        shard every step, as in Chen et al. 2020's experiments).
      test_size: test examples used for evaluation (``0``: the whole test set).
      train_size: training examples kept before the partition, a fixed stratified subset drawn
        from the run's seed (``0``: the whole training set); e.g. ``1000`` with ``n = 10`` and
        ``partition = "classes"`` gives 10 workers x 100 examples of one class each.
    """

    dataset: str = "auto"
    dir: str = ""
    partition: str = "iid"
    alpha: float = 1.0
    classes_per_worker: int = 1
    gamma: float = 0.5
    batch_size: int = 32
    test_size: int = 0
    train_size: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model (:func:`rbyz.sim.models.build`): ``"mlp"``, ``"cnn"`` or ``"logistic"``;
    ``hidden`` is the MLP's hidden width (784-100-10 in the ALIE paper)."""

    name: str = "mlp"
    hidden: int = 100


@dataclasses.dataclass(frozen=True)
class WorkersConfig:
    """``n`` workers, the ``f`` Byzantine ones among them, and the honest workers' momentum
    ``m_i <- beta m_i + g_i`` (``momentum = beta``; ``0`` sends plain gradients)."""

    n: int = 25
    f: int = 5
    momentum: float = 0.0


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """What the Byzantine workers do.

    Attributes:
      name: ``"none"``, an attack of :mod:`rbyz.attacks` (``rbyz list``), or ``"label_flip"``
        (a data attack: the Byzantine workers train on flipped labels and send what they get).
      on: ``"momentum"`` (default: the attack replaces what the workers send, after their
        momentum and a protocol's per-worker noise, as in Karimireddy et al. 2021 and the epfml
        code) or ``"gradients"`` (it replaces the gradients, before the momentum and the noise:
        the attacker controls a worker's data or computation, not what it sends).
      positions: ``"last"``, ``"first"`` or ``"random"`` (redrawn every step, as DETOX does).
      hparams: the attack's hyperparameters (e.g. ``{z = 1.0}`` for ALIE).
      label: the name in the results (default ``name``).
    """

    name: str = "none"
    on: str = "momentum"
    positions: str = "last"
    hparams: dict = dataclasses.field(default_factory=dict)
    label: str = ""


@dataclasses.dataclass(frozen=True)
class DefenceConfig:
    """How the server combines what the workers send.

    Attributes:
      rule: an aggregator of :mod:`rbyz.aggregators` (``rbyz list``), or one of the algorithms
        of :data:`rbyz.sim.train.ALGORITHMS`: ``"signsgd_majority"``, ``"noisy_sign_sgd"``,
        ``"noisy_median_sgd"`` (hyperparameter ``b``), ``"detox"`` (``r``, ``stage2``, ...),
        ``"draco"`` (``r``), ``"election_coding"`` (``code = "deterministic" | "bernoulli"``,
        ``r``, ``b``, ``noise_std``).
      pre: pre-aggregators run before the rule, in order (e.g. ``["nnm"]``).
      pre_hparams: per pre-aggregator hyperparameters, e.g. ``{bucketing = {s = 2}}``.
      hparams: the rule's hyperparameters (e.g. ``{tau = 10.0}`` for centered clipping).
      label: the name in the results (default ``pre`` and ``rule`` joined by ``+``).
    """

    rule: str = "mean"
    pre: tuple[str, ...] = ()
    pre_hparams: dict = dataclasses.field(default_factory=dict)
    hparams: dict = dataclasses.field(default_factory=dict)
    label: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The server's optimizer and the schedule.

    Attributes:
      steps: training steps.
      eval_every: steps between evaluations (and checkpoints); the steps in between run inside
        one ``lax.scan``.
      lr: the server's learning rate.
      server_momentum: heavy-ball momentum of the server's SGD (``0``: plain SGD).
      optimizer: ``"sgd"`` or ``"adam"``.
      checkpoint_every: evaluations between checkpoints (``0``: no checkpoints).
    """

    steps: int = 300
    eval_every: int = 50
    lr: float = 0.1
    server_momentum: float = 0.0
    optimizer: str = "sgd"
    checkpoint_every: int = 1


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    """Per-step measurements of why a defence holds or fails (:mod:`rbyz.sim.diagnostics`),
    written to ``diagnostics.csv`` in the run directory.

    Attributes:
      enabled: log them (costs two more evaluations of the aggregator per step for the Byzantine
        share, none for a rule that reports its selection).
      z: the multiples of the workers' standard deviation counted in the ``below_z`` columns
        (the ALIE rebuttal's ``1/2, 1, 2``).
      fail_closed: stop the run (``rbyz.sim.diagnostics.FailClosed``) at the first step whose
        rule rejects more rows than ``workers.f``; needs ``enabled`` and a rule that reports
        its selection (``rbyz list``: reports), without pre-aggregators.
    """

    enabled: bool = False
    z: tuple[float, ...] = (0.5, 1.0, 2.0)
    fail_closed: bool = False


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Where the workers run (:mod:`rbyz.sim.parallel`).

    Attributes:
      devices: the devices the ``n`` workers are spread over, ``n / devices`` per device, the
        step under ``jax.shard_map`` (``1``: one device simulates every worker; ``0``: every
        device of every process, e.g. after ``rbyz run --processes 2``).
      layout: how the workers' updates meet for the aggregation: ``"gather"`` (every device
        gathers all of them and aggregates) or ``"coordinates"`` (each device aggregates its
        ``1/devices`` of the coordinates), as in :func:`rbyz.transforms.aggregate`.
    """

    devices: int = 1
    layout: str = "gather"


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy for the workers' noise (:mod:`rbyz.privacy`, :mod:`rbyz.sim.private`):
    per-example clipping in every worker, noise each worker adds before its update leaves it,
    and the ε this buys, logged per evaluation (the ``epsilon`` column).

    The noise is set by at most one of ``b``, ``noise_multiplier`` and ``epsilon`` (none: no
    noise, clipping only, ε = ∞). With noisy sign / median SGD the privacy noise is the
    algorithm's noise (leave ``defence.hparams.b`` unset). The noise comes before the worker
    momentum, so that the momentum is post-processing.

    Attributes:
      enabled: clip, noise and account.
      clip: ``C``, each example's gradient norm bound.
      b: the noise's std (Gaussian) or scale (Laplace) on each worker's clipped mean (Chen et
        al.'s ``b``).
      noise_multiplier: ``z``; ``b = z C / B`` (``B`` the batch size).
      epsilon: a target ε for the whole run at ``delta``: the smallest noise reaching it for
        every worker.
      delta: the δ of the ε.
      sampling: ``"auto"`` (``"full"`` for ``data.batch_size = 0``, else ``"poisson"``),
        ``"poisson"``, ``"without_replacement"`` or ``"full"``.
      max_batch: the capacity of a Poisson batch (``0``: :attr:`rbyz.privacy.PrivacyPlan.capacity`).
      noise: ``"gaussian"`` or ``"laplace"`` (with ``norm = "l1"``).
      norm: the clipping's norm, ``"l2"`` or ``"l1"``.
      accountant: ``"pld"`` or ``"rdp"``.
      at: ``"worker"`` (local DP) or ``"server"`` (a trusted server adds the noise to the mean;
        only ``defence.rule = "mean"``).
      microbatch: examples per chunk of per-example gradients (``0``: the whole batch at once;
        e.g. ``256`` for a full batch of thousands).
    """

    enabled: bool = False
    clip: float = 1.0
    b: float = 0.0
    noise_multiplier: float = 0.0
    epsilon: float = 0.0
    delta: float = 1e-5
    sampling: str = "auto"
    max_batch: int = 0
    noise: str = "gaussian"
    norm: str = "l2"
    accountant: str = "pld"
    at: str = "worker"
    microbatch: int = 0


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One training run: every setting, with the paper defaults where there is one."""

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    workers: WorkersConfig = dataclasses.field(default_factory=WorkersConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    defence: DefenceConfig = dataclasses.field(default_factory=DefenceConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)

    @property
    def rule_label(self) -> str:
        """The defence's name in results: ``label``, else ``pre`` and ``rule`` joined by ``+``;
        with ``privacy.enabled``, followed by how the noise was set (``median+dp(eps=4)``,
        ``+dp(z=1.1)``, ``+dp(b=0.01)``, ``+dp(clip)`` without noise; ``+dp@server`` for
        central noise), so that runs at different privacy levels are not averaged together."""
        label = self.defence.label or "+".join((*self.defence.pre, self.defence.rule))
        if not self.privacy.enabled:
            return label
        p = self.privacy
        noise = next((f"{name}={value:g}" for name, value in
                      (("eps", p.epsilon), ("z", p.noise_multiplier), ("b", p.b)) if value > 0),
                     "clip")
        return f"{label}+dp({noise})" + ("@server" if p.at == "server" else "")

    @property
    def attack_label(self) -> str:
        """The attack's name in results: ``label``, else ``name``."""
        return self.attack.label or self.attack.name


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


SECTIONS = _hints(Experiment)


def _field_names(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _check_plain(value, path: str) -> None:
    """Hyperparameter tables hold TOML data: numbers, strings, booleans, lists and tables."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{path}[{i}]")
    elif not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"config: {path} must hold numbers, strings, booleans, lists or tables; "
                         f"got {type(value).__name__} {value!r}.")


def _coerce(value, hint, path: str):
    """``value`` as the field's type, or ``ValueError`` naming the field, the type and the value."""
    def wrong(expected: str):
        return ValueError(f"config: {path} must be {expected}; got {type(value).__name__} "
                          f"{value!r}.")

    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if hint is dict:
        if not isinstance(value, Mapping):
            raise wrong("a table")
        _check_plain(value, path)
        return dict(value)
    if hint == tuple[float, ...]:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise wrong("a list of numbers")
        return tuple(float(v) for v in value)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return tuple(value)
    raise TypeError(f"config: no coercion for {hint!r} at {path}")  # a bug here, not the user's


def _build(cls, mapping: Mapping, path: str):
    if not isinstance(mapping, Mapping):
        raise ValueError(f"config: {path or 'the file'} must be a table; got {mapping!r}.")
    hints = _hints(cls)
    kwargs = {}
    for key, value in mapping.items():
        where = f"{path}.{key}" if path else key
        if key not in hints:
            section = path or "the top level"
            raise ValueError(f"config: unknown key {where!r}; {section} accepts "
                             f"{_field_names(cls)}.")
        hint = hints[key]
        kwargs[key] = (_build(hint, value, where) if dataclasses.is_dataclass(hint)
                       else _coerce(value, hint, where))
    return cls(**kwargs)


def from_dict(mapping: Mapping) -> Experiment:
    """An :class:`Experiment` from nested mappings (a parsed TOML document without ``sweep``).

    Raises:
      ValueError: an unknown key or a value of the wrong type, naming the field.
    """
    return _build(Experiment, mapping, "")


def to_dict(exp: Experiment) -> dict:
    """The experiment as nested plain dicts (TOML-ready: tuples become lists)."""
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(exp))


def read(path: str | Path) -> dict:
    """The TOML document at ``path``, parsed as data (``ValueError`` naming the file on a
    syntax error or when it is missing)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config: no such file {str(path)!r}.") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config: {path} is not valid TOML: {err}.") from None


def load(path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """The experiment of the TOML file at ``path`` (its ``[sweep]`` table, if any, ignored),
    with ``overrides`` applied (see :func:`override`)."""
    document = read(path)
    document.pop("sweep", None)
    return override(from_dict(document), overrides)


def _parse_value(text: str):
    """A command-line value read as a TOML value; a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set(mapping: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = mapping
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            raise ValueError(f"config: {dotted!r} does not name a field: {key!r} is not a "
                             f"section; sections are {', '.join(SECTIONS)}.")
        node = child
    node[keys[-1]] = value


def override(exp: Experiment, overrides: Sequence[str]) -> Experiment:
    """``exp`` with ``section.field=value`` overrides applied (values read as TOML values).

    Example:
      >>> override(Experiment(), ["workers.n=7", "defence.pre=['nnm']"]).defence.pre
      ('nnm',)
    """
    document = to_dict(exp)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config: an override is section.field=value (e.g. "
                             f"train.steps=100); got {item!r}.")
        dotted, text = item.split("=", 1)
        _set(document, dotted.strip(), _parse_value(text.strip()))
    return from_dict(document)


# The fields that name what a section's hyperparameters belong to.
_NAMING = {"attack": ("name",), "defence": ("rule",)}


def _lay(document: dict, section: str, table: Mapping, where: str) -> None:
    """Lays ``table``'s fields over ``document[section]``."""
    if not (section in SECTIONS and dataclasses.is_dataclass(SECTIONS[section])):
        tables = [k for k, t in SECTIONS.items() if dataclasses.is_dataclass(t)]
        raise ValueError(f"config: {where}: {section!r} is not a section; sections are "
                         f"{', '.join(tables)}.")
    _build(SECTIONS[section], table, where)  # names a bad field here
    merged = dict(document[section])
    if any(key in table for key in _NAMING.get(section, ())):
        # A table that names another attack or rule starts from that one's defaults: the
        # base's hyperparameters belong to the base's rule.
        merged.update(hparams={}, label="")
    merged.update(table)
    document[section] = merged


def expand(document: Mapping) -> list[Experiment]:
    """Every experiment of a sweep document: the base (the document without ``sweep``) with each
    combination of the ``[sweep]`` axes applied, in order (the last axis varies fastest).

    Example:
      >>> grid = expand({"sweep": {"seed": [0, 1], "attack": [{"name": "none"},
      ...                                                  {"name": "alie"}]}})
      >>> [(e.seed, e.attack.name) for e in grid]
      [(0, 'none'), (0, 'alie'), (1, 'none'), (1, 'alie')]
    """
    document = dict(document)
    sweep = document.pop("sweep", {})
    base = to_dict(from_dict(document))
    if not isinstance(sweep, Mapping) or not sweep:
        raise ValueError("config: a sweep needs a [sweep] table of axes, e.g. seed = [0, 1, 2] "
                         "or attack = [{name = \"none\"}, {name = \"alie\"}].")
    axes = []
    for name, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"config: sweep.{name} must be a non-empty list; got {values!r}.")
        section = name if name in SECTIONS and dataclasses.is_dataclass(SECTIONS[name]) else None
        if section:
            for value in values:
                if not isinstance(value, Mapping):
                    raise ValueError(f"config: sweep.{name} lists tables of {name} fields, e.g. "
                                     f"{{{_field_names(SECTIONS[name]).split(', ')[0]} = ...}}; "
                                     f"got {value!r}.")
        elif "." in name and name.split(".")[0] not in SECTIONS:
            raise ValueError(f"config: sweep.{name} names no field; axes are sections "
                             f"({', '.join(s for s in SECTIONS if s not in ('name', 'seed'))}), "
                             f"dotted fields such as seed or workers.f, or any other name for "
                             f"a list of partial experiments.")
        elif name not in SECTIONS and "." not in name:
            for value in values:
                if not isinstance(value, Mapping):
                    raise ValueError(f"config: sweep.{name} is not a field, so it lists partial "
                                     f"experiments (tables of sections, e.g. {{defence = {{rule "
                                     f"= \"median\"}}, workers = {{momentum = 0.9}}}}); got "
                                     f"{value!r}.")
                for key in value:
                    if key not in SECTIONS:
                        raise ValueError(f"config: sweep.{name}: unknown key {key!r}; a "
                                         f"partial experiment holds {', '.join(SECTIONS)}.")
            section = "*"
        axes.append((name, section, values))

    grid = []
    for combination in itertools.product(*(values for _, _, values in axes)):
        document = to_dict(from_dict(base))
        for (name, section, _), value in zip(axes, combination):
            if section == "*":
                for key, part in value.items():
                    if isinstance(part, Mapping):
                        _lay(document, key, part, f"sweep.{name}.{key}")
                    else:
                        _set(document, key, part)
            elif section:
                _lay(document, section, value, f"sweep.{name}")
            else:
                _set(document, name, value)
        grid.append(from_dict(document))
    return grid


__all__ = ("AttackConfig", "DataConfig", "DefenceConfig", "DiagnosticsConfig", "Experiment",
           "ModelConfig", "ParallelConfig", "PrivacyConfig",
           "TrainConfig", "WorkersConfig", "expand", "from_dict", "load", "override", "read",
           "to_dict")
