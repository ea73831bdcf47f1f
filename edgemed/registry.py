"""A small name -> class registry, used for steps, format backends, int4 algorithms and model families.

A registry knows its plugin modules by name (data, as Olive's olive_config.json lists its passes)
and imports them on first use: each plugin registers itself with a decorator or by subclassing,
so the registry never imports its plugins' code and nothing low in the package imports upward.
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from edgemed.errors import BadInputError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, plugins: tuple[str, ...] = ()):
        self.kind = kind
        self.plugins = plugins
        self._items: dict[str, T] = {}
        self._loaded = not plugins
        self._loading = False

    def _load(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True  # a plugin that looks the registry up while it is imported sees what is there
        try:
            for module in self.plugins:
                importlib.import_module(module)
            self._loaded = True
        finally:
            self._loading = False

    def register(self, *names: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for name in names:
                if name in self._items:
                    raise ValueError(f"{self.kind} '{name}' registered twice")
                self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, what: str | None = None) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise BadInputError(
                what or f"{self.kind} '{name}'",
                f"unknown {self.kind} '{name}'",
                f"use one of: {', '.join(sorted(self._items))}",
            ) from None

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._items))

    def items(self):
        self._load()
        return sorted(self._items.items())
