"""A small name -> class registry, used for steps (quantize/prune/export) and model families."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from edgemed.errors import BadInputError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for name in names:
                if name in self._items:
                    raise ValueError(f"{self.kind} '{name}' registered twice")
                self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, what: str | None = None) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise BadInputError(
                what or f"{self.kind} '{name}'",
                f"unknown {self.kind} '{name}'",
                f"use one of: {', '.join(sorted(self._items))}",
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self):
        return sorted(self._items.items())
