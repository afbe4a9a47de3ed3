"""The dataset and runner registries: a name is one class's, and only a plugin class
of the right kind is registered (a plugin called `gsm8k` used to replace the built-in
GSM8K silently)."""

from __future__ import annotations

import logging

import pytest

from backend.common.registry import RegistryError
from backend.datasets import registry as datasets
from backend.datasets.base import Dataset
from backend.runners import registry as runners
from backend.runners.base import Runner


@pytest.fixture(autouse=True)
def _own_registries(monkeypatch):
    monkeypatch.setattr(datasets._registry, "_classes", dict(datasets._registry._classes))
    monkeypatch.setattr(runners._registry, "_classes", dict(runners._registry._classes))


def _dataset(name: str) -> type[Dataset]:
    return type("Plugin", (Dataset,), {"name": name, "description": "a plugin",
                                       "__module__": "my_plugins"})


def test_a_plugin_cannot_take_a_built_in_dataset_name():
    with pytest.raises(RegistryError) as caught:
        datasets.register(_dataset("gsm8k"))
    message = str(caught.value)
    assert "backend.datasets.gsm8k:GSM8K" in message and "my_plugins:Plugin" in message
    assert type(datasets.get_dataset("gsm8k")).__module__ == "backend.datasets.gsm8k"


def test_two_plugins_cannot_share_a_name():
    first = datasets.register(_dataset("my_qa"))
    second = _dataset("my_qa")
    second.__qualname__ = "Other"
    with pytest.raises(RegistryError, match="my_plugins:Plugin.*my_plugins:Other"):
        datasets.register(second)
    assert type(datasets.get_dataset("my_qa")) is first
    assert datasets.register(first) is first  # the same class again is no clash


def test_only_subclasses_are_registered():
    class NotADataset:
        name = "loose"

    with pytest.raises(TypeError, match="not a dataset class"):
        datasets.register(NotADataset)
    with pytest.raises(TypeError, match="not a runner class"):
        runners.register(NotADataset)
    assert "loose" not in datasets.dataset_names()


def test_a_plugin_runner_cannot_take_the_openai_scheme():
    plugin = type("MyOpenAI", (Runner,), {"scheme": "openai", "__module__": "my_plugins"})
    with pytest.raises(RegistryError, match="openai.runner:OpenAIRunner.*my_plugins:MyOpenAI"):
        runners.register(plugin)
    assert runners.get_runner("openai").__name__ == "OpenAIRunner"


def test_a_plugin_folder_with_a_clashing_name_is_logged_and_the_built_in_kept(tmp_path, caplog):
    from backend.engine.plugins import load_plugins

    (tmp_path / "my_gsm8k.py").write_text(
        "from backend.datasets.base import Dataset\n"
        "from backend.datasets.registry import register\n\n"
        "@register\nclass MyGSM8K(Dataset):\n    name = 'gsm8k'\n    description = 'mine'\n")
    with caplog.at_level(logging.ERROR):
        load_plugins([str(tmp_path)])
    assert "my_gsm8k.py failed to load" in caplog.text
    assert "backend.datasets.gsm8k:GSM8K" in caplog.text and "MyGSM8K" in caplog.text
    assert type(datasets.get_dataset("gsm8k")).__module__ == "backend.datasets.gsm8k"
