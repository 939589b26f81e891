"""One generic registry for every pluggable part (merge rules, rank rules, robust reductions,
PEFT methods), in the style of Opacus' accountant registry: a name maps to an object, an unknown
name is an error naming the config key, the value and what is registered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind  # what is registered, for messages ("merge rule")
        self.key = key  # the run-config key that names one ("merge")
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")``."""
        return lambda item: self.add(name, item)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(f"{self.key}={name!r}: unknown {self.kind}; registered: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
