"""Dataset registry: names mapped to classes, imported only when first asked for.

Built-in datasets are listed in `BUILTIN` as "module:Class" strings so that a
heavy dataset module loads only when a job uses it; `register` adds a class
(third-party plugins use it the same way).
"""

from __future__ import annotations

import importlib

from backend.datasets.base import Dataset

BUILTIN: dict[str, str] = {
    "needle_in_haystack": "backend.datasets.needle_in_haystack:NeedleInAHaystack",
}

_registered: dict[str, type[Dataset]] = {}


class UnknownDataset(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown dataset {self.name!r}; known: {', '.join(dataset_names())}"


def register(cls: type[Dataset]) -> type[Dataset]:
    """Class decorator: make `cls` available under `cls.name`."""
    _registered[cls.name] = cls
    return cls


def dataset_names() -> list[str]:
    return sorted(set(BUILTIN) | set(_registered))


def get_dataset(name: str) -> Dataset:
    """An instance of the dataset called `name`; raises UnknownDataset."""
    if name not in _registered:
        target = BUILTIN.get(name)
        if target is None:
            raise UnknownDataset(name)
        module, _, cls_name = target.partition(":")
        _registered[name] = getattr(importlib.import_module(module), cls_name)
    return _registered[name]()
