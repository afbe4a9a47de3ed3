"""Runner registry: model-reference schemes mapped to runner classes, imported only
when first asked for (as backend.datasets.registry does for datasets).

A reference `<name>:<rest>` whose `<name>` is a registered runner goes to that
runner (`openai:gpt-4o`); every other reference (a checkpoint folder, a hub id,
`builtin:tiny`) goes to the transformers runner, `DEFAULT`. Built-in runners are
listed in `BUILTIN` as "module:Class" strings, so torch-free callers (the server)
never import a backend they do not use; `register` adds a class, the same way for
third-party plugins (a module in LBS_PLUGIN_DIRS or an installed package's entry
point, loaded by backend.engine.plugins; see docs/adding-a-runner.md).
"""

from __future__ import annotations

import re

from backend.common.registry import Registry
from backend.runners.base import Runner

DEFAULT = "hf"

BUILTIN: dict[str, str] = {
    "hf": "backend.runners.hf.runner:HFRunner",
    "openai": "backend.runners.openai.runner:OpenAIRunner",
}

_registry: Registry[type[Runner]] = Registry("runner", Runner, BUILTIN,
                                             lambda cls: cls.scheme)
_SCHEME = re.compile(r"^([a-z][a-z0-9_-]*):")


class UnknownRunner(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown runner {self.name!r}; known: {', '.join(runner_names())}"


def register(cls: type[Runner]) -> type[Runner]:
    """Class decorator: serve references `<cls.scheme>:<rest>` with `cls`; refuses a
    scheme that is taken and a class that is not a Runner."""
    if isinstance(cls, type) and issubclass(cls, Runner) and (
            not cls.scheme or not _SCHEME.match(cls.scheme + ":")):
        raise ValueError(f"a runner's scheme must be lower-case letters, digits, _ or -, "
                         f"starting with a letter; got {cls.scheme!r}")
    return _registry.register(cls)


def runner_names() -> list[str]:
    return _registry.names()


def get_runner(name: str) -> type[Runner]:
    """The runner class registered as `name`; raises UnknownRunner."""
    cls = _registry.get(name)
    if cls is None:
        raise UnknownRunner(name)
    return cls


def runner_name_for(reference: str) -> str:
    """The registry name of the runner that serves the model reference `reference`."""
    match = _SCHEME.match(reference.strip())
    if match and match.group(1) != DEFAULT and match.group(1) in runner_names():
        return match.group(1)
    return DEFAULT
