"""A release frees the model: when the model manager's release returns (it has just
collected garbage and emptied the allocators' caches), nothing references the model
any more, whatever path the job took (run through run_evaluation with the real manager).
A reference that dies only later, when the job's frames go, has kept the memory past
the release: the CUDA cache was emptied while the weights were still held."""

from __future__ import annotations

import gc
import weakref

import pytest

from backend.engine.contracts import CacheMode
from backend.engine.evaluation import run_evaluation
from backend.engine.memory.entries import ManagerConfig
from backend.engine.memory.manager import ModelManager
from backend.engine.preparation import prepare
from backend.runners.hf.runner import HFRunner

NIAH = {"context_lengths": [256], "depth_percents": [0, 100], "max_new_tokens": 4}


class _Sink:
    def __init__(self):
        self.records = []

    def stored(self):
        return {}

    def set_total(self, total):
        pass

    def set_manifest(self, manifest):
        self.manifest = manifest

    def write(self, record):
        self.records.append(record)
        return True


class _Models(list):
    """Weak references to every model HFRunner.load makes, and how many of them were
    still alive right after each release of the model manager."""

    def __init__(self):
        super().__init__()
        self.alive_after_release: list[int] = []

    def alive(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self)


@pytest.fixture
def models(monkeypatch):
    made = _Models()
    load = HFRunner.load.__func__
    release = ModelManager._release

    def loading(cls, *args, **kwargs):
        runner = load(cls, *args, **kwargs)
        made.append(weakref.ref(runner.model))
        return runner

    def releasing(self, entry, why):
        event = release(self, entry, why)
        made.alive_after_release.append(made.alive())
        return event

    monkeypatch.setattr(HFRunner, "load", classmethod(loading))
    monkeypatch.setattr(ModelManager, "_release", releasing)
    return made


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_uncached_job_frees_the_model(settings, with_tiny, models, use_chat_template):
    manager = ModelManager(ManagerConfig.from_settings(settings))
    job = prepare("builtin:tiny", "needle_in_haystack",
                  {**NIAH, "use_chat_template": use_chat_template}, settings)
    sink = _Sink()
    run_evaluation(job, manager, settings, sink)
    assert len(sink.records) == 2 and len(models) == 1
    assert manager.loaded() == []
    assert models.alive_after_release == [0], "the model outlived its release"


def test_plain_prompts_are_not_templated(settings, with_tiny):
    manager = ModelManager(ManagerConfig.from_settings(settings))
    sinks = {}
    for flag in (True, False):
        job = prepare("builtin:tiny", "needle_in_haystack",
                      {**NIAH, "use_chat_template": flag}, settings)
        sinks[flag] = _Sink()
        run_evaluation(job, manager, settings, sinks[flag])
    assert all(r.prompt.startswith("<s><|user|>") for r in sinks[True].records)
    assert not any("<|user|>" in r.prompt for r in sinks[False].records)


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_comparison_frees_each_model_before_the_next(settings, with_tiny, models,
                                                     use_chat_template):
    manager = ModelManager(ManagerConfig.from_settings(settings))
    job = prepare("builtin:tiny", "needle_in_haystack",
                  {**NIAH, "methods": ["basic", "optimized"],
                   "use_chat_template": use_chat_template}, settings)
    run_evaluation(job, manager, settings, _Sink())
    assert len(models) == 2
    assert models.alive_after_release == [0, 0]


@pytest.mark.parametrize("use_chat_template", [True, False])
@pytest.mark.parametrize("where", ["score", "forward"])
def test_failed_job_frees_the_model(settings, with_tiny, models, monkeypatch,
                                    use_chat_template, where):
    """A job that fails in scoring, or inside the model's forward (a CUDA error, say:
    the traceback then holds the model's own frames)."""
    manager = ModelManager(ManagerConfig.from_settings(settings))
    job = prepare("builtin:tiny", "needle_in_haystack",
                  {**NIAH, "use_chat_template": use_chat_template}, settings)

    def broken(*args, **kwargs):
        raise RuntimeError("it broke")

    if where == "score":
        monkeypatch.setattr(job.dataset, "score", broken)
    else:
        from transformers import LlamaForCausalLM

        monkeypatch.setattr(LlamaForCausalLM, "forward", broken)
    with pytest.raises(RuntimeError, match="it broke"):
        run_evaluation(job, manager, settings, _Sink())
    assert manager.loaded() == []
    assert models.alive_after_release == [0]


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_cached_model_released_on_request(settings, with_tiny, models, use_chat_template):
    manager = ModelManager(ManagerConfig.from_settings(settings))
    job = prepare("builtin:tiny", "needle_in_haystack",
                  {**NIAH, "use_chat_template": use_chat_template}, settings)
    job.dataset.cache_mode = CacheMode.CACHED
    run_evaluation(job, manager, settings, _Sink())
    assert manager.loaded() == ["builtin:tiny"] and models.alive() == 1
    manager.release("builtin:tiny")
    assert models.alive_after_release == [0]


def test_release_returns_the_weights_rss(settings, data_dir):
    """The case reproduced on CPU before the fix: an uncached NIAH job on builtin:small
    (43 MB of weights) with use_chat_template=false returned 1 MB at its release."""
    manager = ModelManager(ManagerConfig.from_settings(settings))
    job = prepare("builtin:small", "needle_in_haystack",
                  {"context_lengths": [256], "depth_percents": [50], "max_new_tokens": 2,
                   "use_chat_template": False}, settings)
    outcome = run_evaluation(job, manager, settings, _Sink())
    (release,) = [e for e in outcome.events if e["kind"] == "release"]
    returned = release["rss_before_bytes"] - release["rss_after_bytes"]
    assert release["bytes"] > 40 * 2**20
    assert returned > 0.75 * release["bytes"], release["note"]
