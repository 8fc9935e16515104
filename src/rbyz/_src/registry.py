"""Name -> function registries, for configs and the command line."""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
    """A mapping from public names to rules (aggregators, attacks, ...).

    Example:
      >>> reg = Registry("aggregator")
      >>> @reg.register("double")
      ... def double(x):
      ...     return 2 * x
      >>> reg.get("double")(3), reg.names()
      (6, ('double',))
    """

    def __init__(self, kind: str):
        self._kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator adding a function under ``name`` (default: its ``__name__``)."""

        def add(fn: F) -> F:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self._kind} registry: {key!r} is already registered.")
            self._entries[key] = fn
            return fn

        return add

    def get(self, name: str) -> Callable:
        """The function registered as ``name``; ``ValueError`` listing the known names if none."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self._kind} {name!r}; known: {', '.join(self.names())}."
            ) from None

    def names(self) -> tuple[str, ...]:
        """All registered names, sorted."""
        return tuple(sorted(self._entries))
