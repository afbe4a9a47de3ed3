"""A registry of plugin classes by name, shared by the dataset and runner registries.

Built-in classes are listed as "module:Class" strings and imported only when first
asked for, so a torch-free process (the server) never imports a backend it does not
use. `register` adds a class; it refuses a name that is taken (a built-in's included:
a plugin called `gsm8k` does not quietly replace the built-in one) and a class that is
not a subclass of the registry's base, with an error that names both.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


def _where(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class RegistryError(ValueError):
    """A class cannot be registered (its name is taken, or it is the wrong kind)."""


class Registry(Generic[T]):
    """Classes of one kind (`base`) by name; `name_of` reads a class's name."""

    def __init__(self, kind: str, base: T, builtin: dict[str, str],
                 name_of: Callable[[T], str]):
        self.kind = kind
        self.base = base
        self.builtin = builtin
        self.name_of = name_of
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Make `cls` available under its name; raises RegistryError naming both
        classes when the name is another class's, and TypeError for a class that is
        not a `base`. A built-in module registering its own class is no clash."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a {self.kind} class (a subclass of "
                            f"{_where(self.base)}), so it cannot be registered")
        name = self.name_of(cls)
        held = self._classes.get(name)
        if held is not None and held is not cls:
            raise RegistryError(f"{self.kind} name {name!r} is taken by {_where(held)}; "
                                f"{_where(cls)} needs another name")
        builtin = self.builtin.get(name)
        if held is None and builtin is not None and builtin != _where(cls):
            raise RegistryError(f"{self.kind} name {name!r} is the built-in {builtin}; "
                                f"{_where(cls)} needs another name")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(set(self.builtin) | set(self._classes))

    def get(self, name: str) -> T | None:
        """The class registered as `name` (a built-in imported now), None when none is."""
        if name not in self._classes:
            target = self.builtin.get(name)
            if target is None:
                return None
            module, _, cls_name = target.partition(":")
            cls = getattr(importlib.import_module(module), cls_name)
            self._classes.setdefault(name, cls)
        return self._classes[name]
