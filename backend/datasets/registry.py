"""Dataset registry: names mapped to classes, imported only when first asked for.

Built-in datasets are listed in `BUILTIN` as "module:Class" strings so that a
heavy dataset module loads only when a job uses it; `register` adds a class
(third-party plugins use it the same way; backend.engine.plugins loads them).
"""

from __future__ import annotations

from backend.common.registry import Registry
from backend.common.suggest import did_you_mean
from backend.datasets.base import DataContext, Dataset

BUILTIN: dict[str, str] = {
    "needle_in_haystack": "backend.datasets.needle_in_haystack:NeedleInAHaystack",
    "ceval": "backend.datasets.ceval:CEval",
    "gsm8k": "backend.datasets.gsm8k:GSM8K",
    "mr_gsm8k": "backend.datasets.mr_gsm8k:MRGSM8K",
    "longbench": "backend.datasets.longbench:LongBench",
    "longbench_v2": "backend.datasets.longbench_v2:LongBenchV2",
    "lm_eval": "backend.datasets.lm_eval_tasks:LmEvalTasks",
}

_registry: Registry[type[Dataset]] = Registry("dataset", Dataset, BUILTIN,
                                              lambda cls: cls.name)


class UnknownDataset(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        names = dataset_names()
        return (f"unknown dataset {self.name!r}{did_you_mean(self.name, names)} "
                f"(known: {', '.join(names)})")


def register(cls: type[Dataset]) -> type[Dataset]:
    """Class decorator: make `cls` available under `cls.name`; refuses a name that is
    taken and a class that is not a Dataset (common.registry.Registry.register)."""
    return _registry.register(cls)


def dataset_names() -> list[str]:
    return _registry.names()


def get_dataset(name: str, context: DataContext | None = None) -> Dataset:
    """An instance of the dataset called `name` for one job (or data status), made with
    its `context` (settings, data folder, access, confinement); raises UnknownDataset."""
    cls = _registry.get(name)
    if cls is None:
        raise UnknownDataset(name)
    return cls(context)
