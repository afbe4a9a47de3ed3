"""Dataset registry: names mapped to classes, imported only when first asked for.

Built-in datasets are listed in `BUILTIN` as "module:Class" strings so that a
heavy dataset module loads only when a job uses it; `register` adds a class
(third-party plugins use it the same way).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from backend.common.suggest import did_you_mean
from backend.datasets.base import Dataset

log = logging.getLogger(__name__)

BUILTIN: dict[str, str] = {
    "needle_in_haystack": "backend.datasets.needle_in_haystack:NeedleInAHaystack",
    "ceval": "backend.datasets.ceval:CEval",
    "gsm8k": "backend.datasets.gsm8k:GSM8K",
    "mr_gsm8k": "backend.datasets.mr_gsm8k:MRGSM8K",
    "longbench": "backend.datasets.longbench:LongBench",
    "longbench_v2": "backend.datasets.longbench_v2:LongBenchV2",
    "lm_eval": "backend.datasets.lm_eval_tasks:LmEvalTasks",
}

_registered: dict[str, type[Dataset]] = {}


class UnknownDataset(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        names = dataset_names()
        return (f"unknown dataset {self.name!r}{did_you_mean(self.name, names)} "
                f"(known: {', '.join(names)})")


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


_loaded_dirs: set[str] = set()
ENTRY_POINT_GROUP = "llm_bench_shower.datasets"
_entry_points_loaded = False


def load_entry_points() -> None:
    """Register datasets that installed packages declare under the entry-point group
    `llm_bench_shower.datasets` (name = dataset name, value = "module:Class")."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception:  # noqa: BLE001 - one broken package must not stop the product
            log.exception("[Datasets] entry point %s failed to load", ep.value)
            continue
        _registered[ep.name] = cls
        log.info("[Datasets] loaded %s from %s", ep.name, ep.value)


def load_plugin_dirs(dirs: list[str]) -> None:
    """Import every `*.py` module in `dirs` (LBS_PLUGIN_DIRS); modules register their
    datasets with `register` here and their runners with `backend.runners.registry.register`
    (this one loader serves both). A module that fails to import is logged and skipped.
    Installed packages' entry points are loaded here too."""
    load_entry_points()
    for folder in dirs:
        path = Path(folder).expanduser().resolve()
        if str(path) in _loaded_dirs or not path.is_dir():
            if not path.is_dir():
                log.warning("[Plugins] plugin folder %s does not exist", path)
            continue
        _loaded_dirs.add(str(path))
        for file in sorted(path.glob("*.py")):
            name = f"lbs_plugin_{file.stem}"
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            try:
                sys.modules[name] = module
                spec.loader.exec_module(module)
            except Exception:  # noqa: BLE001 - one broken plugin must not stop the product
                sys.modules.pop(name, None)
                log.exception("[Plugins] plugin %s failed to load", file)
                continue
            log.info("[Plugins] loaded plugin %s", file)
