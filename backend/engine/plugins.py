"""Loading third-party plugins, datasets and runners alike, in one place.

Two ways in: a module in a folder of LBS_PLUGIN_DIRS, imported here, which registers
its classes with `backend.datasets.registry.register` or
`backend.runners.registry.register`; or an installed package that declares them as
entry points, in the group `llm_bench_shower.datasets` (name = the dataset's name) or
`llm_bench_shower.runners` (name = the runner's scheme). A plugin that fails to load,
or whose name is taken (by a built-in or another plugin), is logged and skipped: one
broken plugin does not stop the product.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

from backend.datasets import registry as datasets
from backend.runners import registry as runners

log = logging.getLogger(__name__)

ENTRY_POINT_GROUPS = {"llm_bench_shower.datasets": datasets.register,
                      "llm_bench_shower.runners": runners.register}

_loaded_dirs: set[str] = set()
_entry_points_loaded = False


def load_entry_points() -> None:
    """Register the datasets and runners installed packages declare (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for group, register in ENTRY_POINT_GROUPS.items():
        for ep in entry_points(group=group):
            try:
                register(ep.load())
            except Exception:  # noqa: BLE001 - one broken package must not stop the product
                log.exception("[Plugins] entry point %s = %s failed to load", ep.name, ep.value)
                continue
            log.info("[Plugins] loaded %s from %s", ep.name, ep.value)


def load_plugins(dirs: list[str]) -> None:
    """Installed packages' entry points, then every `*.py` module in `dirs`
    (LBS_PLUGIN_DIRS), each folder once per process."""
    load_entry_points()
    for folder in dirs:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            log.warning("[Plugins] plugin folder %s does not exist", path)
            continue
        if str(path) in _loaded_dirs:
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
