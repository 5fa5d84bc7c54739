"""A name -> class registry, so the skeleton never names a mechanism (no if/elif chains)."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a config name (e.g. ``mixer="relative"``) to the class that implements it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice.")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"Unknown {self.kind} '{name}'; expected one of {self.names()}.")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def import_mechanisms(package: str, path: Iterable[str]) -> list[str]:
    """Import every public module of `package` (a registry package's `__init__` passes its `__name__` and
    `__path__`), so a mechanism registers by existing: adding one is a new file, with no import line in a
    core file. Modules are imported in name order; an import error is raised, never skipped. Returns the
    module names. (A saved folder's flat copy gets these imports written out: `longlm.remote_code`.)"""
    names = sorted(info.name for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
