"""Runner registry: model-reference schemes mapped to runner classes, imported only
when first asked for (as backend.datasets.registry does for datasets).

A reference `<name>:<rest>` whose `<name>` is a registered runner goes to that
runner (`openai:gpt-4o`); every other reference (a checkpoint folder, a hub id,
`builtin:tiny`) goes to the transformers runner, `DEFAULT`. Built-in runners are
listed in `BUILTIN` as "module:Class" strings, so torch-free callers (the server)
never import a backend they do not use; `register` adds a class, the same way for
third-party plugins (a module in LBS_PLUGIN_DIRS, see docs/adding-a-runner.md).
"""

from __future__ import annotations

import importlib
import re

from backend.runners.base import Runner

DEFAULT = "hf"

BUILTIN: dict[str, str] = {
    "hf": "backend.runners.hf.runner:HFRunner",
    "openai": "backend.runners.openai.runner:OpenAIRunner",
}

_registered: dict[str, type[Runner]] = {}
_SCHEME = re.compile(r"^([a-z][a-z0-9_-]*):")


class UnknownRunner(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown runner {self.name!r}; known: {', '.join(runner_names())}"


def register(cls: type[Runner]) -> type[Runner]:
    """Class decorator: serve references `<cls.scheme>:<rest>` with `cls`."""
    if not cls.scheme or not _SCHEME.match(cls.scheme + ":"):
        raise ValueError(f"a runner's scheme must be lower-case letters, digits, _ or -, "
                         f"starting with a letter; got {cls.scheme!r}")
    _registered[cls.scheme] = cls
    return cls


def runner_names() -> list[str]:
    return sorted(set(BUILTIN) | set(_registered))


def get_runner(name: str) -> type[Runner]:
    """The runner class registered as `name`; raises UnknownRunner."""
    if name not in _registered:
        target = BUILTIN.get(name)
        if target is None:
            raise UnknownRunner(name)
        module, _, cls_name = target.partition(":")
        _registered[name] = getattr(importlib.import_module(module), cls_name)
    return _registered[name]


def runner_name_for(reference: str) -> str:
    """The registry name of the runner that serves the model reference `reference`."""
    match = _SCHEME.match(reference.strip())
    if match and match.group(1) != DEFAULT and match.group(1) in runner_names():
        return match.group(1)
    return DEFAULT


def runner_for(reference: str) -> type[Runner]:
    """The runner class that serves `reference` (see the module docstring)."""
    return get_runner(runner_name_for(reference))
