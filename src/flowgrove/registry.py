"""Name -> factory registries for policies and rewards (ddpo-style; heavy imports stay inside factories)."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Factories registered by name; unknown names are errors that list the known ones and the closest."""

    def __init__(self, kind: str, plural: str) -> None:
        self.kind, self.plural = kind, plural
        self._factories: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """A decorator that stores the factory under ``name`` (a different factory under a used name raises)."""

        def decorator(factory: F) -> F:
            known = self._factories.get(name)
            if known is not None and known is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered ({known.__module__}); pick another name.")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def factory(self, name: str) -> F:
        """The factory registered under ``name``; an unknown name lists the known ones and the closest."""
        if name not in self._factories:
            close = difflib.get_close_matches(name, self._factories, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}.{hint}")
        return self._factories[name]

    def build(self, name: str, **kwargs: object) -> object:
        return self.factory(name)(**kwargs)
