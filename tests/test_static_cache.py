"""The optimized method's static KV cache: a few coarse sizes
(`cache_length`), one cache kept and reset between requests of the same size so a
compiled decode step meets the same shapes and, on CUDA, the same addresses (its CUDA
graphs are recorded once), released with the pass; and a methods comparison's warm-up
runs in the size the first timed item uses.

Compiled here on the CPU with the eager backend and transformers' switch for compiling
off CUDA, counted with dynamo's own counters (as ../shared/gpu-check/repro/r1 does)."""

from __future__ import annotations

import gc
import weakref

import pytest

from backend.engine.contracts import GenerationRequest
from backend.runners.hf.account import cache_length
from backend.runners.hf.loading import LoadOptions
from backend.runners.hf.runner import HFRunner
from backend.runners.models import resolve_model


class _Made(list):
    """Slots of each StaticCache made; `log` also gets ("cache", slots) in turn."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple] = []


@pytest.fixture
def made_caches(monkeypatch):
    """Every StaticCache made: its slots."""
    from transformers import StaticCache

    made = _Made()
    init = StaticCache.__init__

    def recording(self, *args, **kwargs):
        made.append(kwargs.get("max_cache_len"))
        made.log.append(("cache", kwargs.get("max_cache_len")))
        init(self, *args, **kwargs)
    monkeypatch.setattr(StaticCache, "__init__", recording)
    return made


def test_cache_sizes_are_few_and_bounded():
    """Prompts of 257 to 500 tokens with a few new tokens share one size; a size is
    never short of what is needed and, past the smallest, at most twice it (four sizes
    per doubling past 4096 tokens, where the slots cost real memory: at most 1/4 more)."""
    assert {cache_length(n) for n in range(257, 513)} == {512}
    assert len({cache_length(n) for n in range(1, 4097)}) == 5  # 256 … 4096
    for n in list(range(1, 5000, 7)) + [8191, 8193, 100_000, 131_072, 131_073]:
        size = cache_length(n)
        assert n <= size <= max(256, 2 * n)
        if n > 4096:
            assert size <= 1.25 * n
    assert len({cache_length(n) for n in range(4097, 131_073)}) == 20


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_prompts_within_one_size_compile_once_on_one_cache(settings, with_tiny,
                                                           made_caches):
    import torch
    from transformers import CompileConfig

    torch.compiler.reset()
    spec = resolve_model("builtin:tiny", settings)
    runner = HFRunner.load(spec, LoadOptions.from_settings(settings, "optimized"), settings)
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True  # transformers' switch for compiling off CUDA
    runner.model.generation_config.compile_config = config
    plain = HFRunner.load(spec, LoadOptions.from_settings(settings), settings)
    prompts = [runner.render("word " * n) for n in (130, 165, 210)]
    lengths = [runner.count_prompt(p) for p in prompts]
    assert len(set(lengths)) == 3 and all(256 < n and n + 5 <= 512 for n in lengths), lengths
    graphs, addresses, got = [], [], []
    for p in prompts:
        got.append(runner.generate([GenerationRequest(p, 6)])[0].text)
        graphs.append(_graphs())
        addresses.append(runner._static[1].layers[0].keys.data_ptr())
    assert got == [plain.generate([GenerationRequest(p, 6)])[0].text for p in prompts]
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 3, f"graphs per prompt: {graphs}"
    assert made_caches == [512], "one cache, reset between requests"
    assert len(set(addresses)) == 1, "the same cache memory: CUDA graphs replay"
    # another size replaces the kept cache (never two held at once)
    runner.generate([GenerationRequest(runner.render("word"), 6)])
    assert made_caches == [512, 256]
    runner.close()
    torch.compiler.reset()


@pytest.mark.parametrize("release", ["forget_prefixes", "close"])
def test_the_kept_cache_goes_with_the_pass(settings, with_tiny, release):
    """The kept cache is memory the account counts for the running batch only:
    forget_prefixes (the end of each pass), offload and close drop it."""
    spec = resolve_model("builtin:tiny", settings)
    runner = HFRunner.load(spec, LoadOptions.from_settings(settings, "optimized"), settings)
    runner.generate([GenerationRequest(runner.render("Where is the library?"), 4)])
    kept = weakref.ref(runner._static[1])
    getattr(runner, release)()
    gc.collect()
    assert kept() is None


def test_the_warm_up_runs_in_the_first_timed_items_cache(settings, with_tiny, made_caches,
                                                         monkeypatch):
    """A comparison's warm-up generates the first item the timed pass will answer, with
    its whole budget: the timed item then finds the cache (and on CUDA the graphs) the
    warm-up made instead of paying a new size inside the measured time."""
    from backend.engine.evaluation import run_evaluation
    from backend.engine.memory.entries import ManagerConfig
    from backend.engine.memory.manager import ModelManager
    from backend.engine.preparation import prepare
    from tests.test_release import _Sink

    log = made_caches.log
    generate = HFRunner.generate

    def logged(self, requests):
        log.append(("generate", [r.prompt for r in requests],
                    [r.max_new_tokens for r in requests]))
        return generate(self, requests)
    monkeypatch.setattr(HFRunner, "generate", logged)
    job = prepare("builtin:tiny", "needle_in_haystack",
                  {"context_lengths": [256, 512], "depth_percents": [0, 100],
                   "max_new_tokens": 8, "methods": ["optimized"]}, settings)
    sink = _Sink()
    run_evaluation(job, ModelManager(ManagerConfig.from_settings(settings)), settings, sink)
    assert len(sink.records) == 4
    warm, cache, first = log[0], log[1], log[2]
    assert warm[0] == "generate" and cache[0] == "cache" and first[0] == "generate"
    assert warm[1:] == first[1:], "the warm-up is the first timed batch, whole budget"
    assert log[3][0] != "cache", "the first timed item reuses the warm-up's cache"


def test_a_batch_that_runs_out_of_memory_keeps_no_cache(settings, with_tiny):
    """The job halves a batch that did not fit and empties the device cache: the
    failed batch's static cache must not stay kept for a size no batch will ask again."""
    import torch

    spec = resolve_model("builtin:tiny", settings)
    runner = HFRunner.load(spec, LoadOptions.from_settings(settings, "optimized"), settings)

    def refuse(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")
    runner.model.register_forward_pre_hook(refuse, with_kwargs=True)
    prompt = runner.render("Where is the library?")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        runner.generate([GenerationRequest(prompt, 4)] * 2)
    assert runner._static is None
    runner.generate([GenerationRequest(prompt, 4)])
    assert runner._static[0] == (1, 256)
