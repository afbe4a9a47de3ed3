"""The transformers runner, the GPU memory cap, and the model manager's cache modes."""

from __future__ import annotations

import logging

import pytest

from backend.engine.contracts import CacheMode, GenerationRequest, HeldModel, ModelNotFound
from backend.engine.memory.manager import ModelManager
from backend.runners.hf.loading import LoadOptions
from backend.runners.hf.placement import build_max_memory
from backend.runners.hf.runner import HFRunner
from backend.runners.models import resolve_model

GiB = 1024**3


def test_max_memory_from_fraction(caplog):
    caplog.set_level(logging.INFO)
    got = build_max_memory(0.8, totals=[80 * GiB, 40 * GiB], cpu_bytes=64 * GiB)
    assert got == {0: int(64 * GiB), 1: int(32 * GiB), "cpu": 64 * GiB}
    assert "[Runner] GPU memory limit set:" in caplog.text
    assert build_max_memory(0.0, totals=[80 * GiB]) is None  # no limit
    assert build_max_memory(0.5, totals=[]) is None  # no GPU


def test_max_memory_for_a_job_on_several_gpus(caplog):
    caplog.set_level(logging.INFO)
    three = [80 * GiB, 80 * GiB, 40 * GiB]
    # num_gpus = 2 without a limit: whole GPUs 0 and 1, so the layers are spread over them
    got = build_max_memory(0.0, totals=three, cpu_bytes=64 * GiB, num_gpus=2)
    assert got == {0: 80 * GiB, 1: 80 * GiB, "cpu": 64 * GiB}
    assert "[Runner] model sharded over 2 GPUs" in caplog.text
    # with a limit, the cap applies to the job's GPUs only
    got = build_max_memory(0.5, totals=three, cpu_bytes=64 * GiB, num_gpus=1)
    assert got == {0: 40 * GiB, "cpu": 64 * GiB}
    assert build_max_memory(0.0, totals=three, num_gpus=1) is None  # whole model on cuda:0


def test_num_gpus_reaches_the_load_options(settings, with_tiny):
    from backend.engine.evaluation import _loader
    from backend.engine.preparation import prepare

    job = prepare("builtin:tiny", "needle_in_haystack", {"context_lengths": [256]}, settings,
                  num_gpus=2)
    key, _, _ = _loader(job, settings, None)
    assert LoadOptions.from_settings(settings, "default", 2) in key
    assert _loader(job, settings, "optimized")[0][-1].num_gpus == 2


@pytest.mark.gpu
def test_num_gpus_two_shards_the_model(settings, with_tiny):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    spec = resolve_model("builtin:small", settings)
    # No limit: a cap below the model would now cap the whole process too (and the
    # allocator reserves 20 MiB segments), so the test relies on transformers' balanced
    # map instead: with two GPUs in max_memory, get_balanced_memory gives each but the
    # last about half the model (transformers/integrations/accelerate.py).
    options = LoadOptions("float16", False, 0.0, "default", num_gpus=2)
    runner = HFRunner.load(spec, options, settings)
    devices = {str(p.device) for p in runner.model.parameters()}
    assert devices == {"cuda:0", "cuda:1"}
    assert set(runner.model.hf_device_map.values()) == {0, 1}  # dispatched over both
    prompt = runner.render("hello " * 50)
    assert runner.generate([GenerationRequest(prompt, 8)])[0].output_tokens == 8


def test_builtin_model_is_deterministic(builtin_models_dir, tmp_path):
    from backend.runners.builtin import ensure_builtin_model

    again = ensure_builtin_model(tmp_path, "tiny")
    first = builtin_models_dir / again.name
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    assert (again / "model.safetensors").stat().st_size < 8 * 2**20


def test_generate_is_greedy_and_handles_template(settings, with_tiny):
    spec = resolve_model("builtin:tiny", settings)
    runner = HFRunner.load(spec, LoadOptions.from_settings(settings), settings)
    prompt = runner.render("Where is the library?")
    assert prompt.startswith("<s><|user|>") and prompt.endswith("<|assistant|>\n")
    a, b = runner.generate([GenerationRequest(prompt, 6), GenerationRequest(prompt, 6)])
    assert a.text == b.text and a.output_tokens == 6
    assert a.prompt_tokens == runner.count_prompt(prompt)
    assert runner.render("hi", chat_template=False) == "hi"


def test_chat_template_is_a_per_request_option(settings, with_tiny):
    """One runner serves templated and plain prompts: a plain prompt gets the tokenizer's
    own special tokens (here a BOS added by its post-processor), a templated one only the
    template's (no second BOS)."""
    from tokenizers import processors

    spec = resolve_model("builtin:tiny", settings)
    runner = HFRunner.load(spec, LoadOptions.from_settings(settings), settings)
    tok = runner.tokenizer
    bos = tok.convert_tokens_to_ids("<s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    message = "Where is the library?"
    plain_ids = tok.encode(message, add_special_tokens=False)
    templated = runner.render(message)
    assert templated.startswith("<s>") and runner.render(message, chat_template=False) == message
    assert runner.count_prompt(message, chat_template=False) == len(plain_ids) + 1
    assert runner.count_prompt(templated) == len(tok.encode(templated, add_special_tokens=False))
    a, b = runner.generate([GenerationRequest(templated, 3),
                            GenerationRequest(message, 3, chat_template=False)])
    assert a.prompt_tokens == runner.count_prompt(templated)
    assert b.prompt_tokens == len(plain_ids) + 1


def test_optimized_method_matches_basic_in_a_padded_batch(settings, with_tiny):
    spec = resolve_model("builtin:tiny", settings)
    basic = HFRunner.load(spec, LoadOptions.from_settings(settings, "basic"), settings)
    optimized = HFRunner.load(spec, LoadOptions.from_settings(settings, "optimized"), settings)
    assert not basic.static_cache and optimized.static_cache  # on every device
    prompts = [basic.render("Where is the library?"),
               basic.render("Which of the rooms in the old house was painted blue last?")]
    alone = [basic.generate([GenerationRequest(p, 12)])[0].text for p in prompts]
    # a batch of two prompts of different lengths is left-padded into one static cache
    together = [g.text for g in optimized.generate([GenerationRequest(p, 12) for p in prompts])]
    assert together == alone


def test_resolve_models(settings, tmp_path):
    with pytest.raises(ModelNotFound, match="builtin:tiny"):
        resolve_model("builtin:huge", settings)
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path / "zoo"), settings)
    with pytest.raises(ModelNotFound, match="LBS_ALLOW_DOWNLOAD"):
        resolve_model("someone/some-model", settings)


class _FakeRunner(HeldModel):
    closed = 0

    def close(self):
        _FakeRunner.closed += 1


@pytest.mark.parametrize("mode, use_cache, loads, closes", [
    (CacheMode.CACHED, True, 1, 0),
    (CacheMode.UNCACHED, True, 2, 2),
    (CacheMode.CACHED, False, 2, 2),
])
def test_cache_modes(mode, use_cache, loads, closes):
    _FakeRunner.closed = 0
    manager = ModelManager(use_cache=use_cache)
    for _ in range(2):
        with manager.use("key", "m", _FakeRunner, mode):
            pass
    assert manager.load_counts["key"] == loads
    assert _FakeRunner.closed == closes


def test_uncached_model_is_released_when_the_job_fails():
    _FakeRunner.closed = 0
    manager = ModelManager()
    with pytest.raises(RuntimeError), manager.use("key", "m", _FakeRunner, CacheMode.UNCACHED):
        raise RuntimeError("boom")
    assert _FakeRunner.closed == 1 and manager.loaded() == []
    assert [e.kind for e in manager.events] == ["load", "release"]


@pytest.mark.gpu
def test_gpu_load_under_cap_and_peaks(settings, with_tiny, monkeypatch):
    import torch

    from backend.common.config import load_settings
    from backend.engine.memory.tracker import CudaPeaks

    monkeypatch.setenv("LBS_GPU_MEMORY_LIMIT", "0.5")
    capped = load_settings()
    spec = resolve_model("builtin:small", capped)
    runner = HFRunner.load(spec, LoadOptions.from_settings(capped), capped)
    # The model fits under the cap: every tensor on cuda:0, placed without accelerate
    # hooks, so no hf_device_map (transformers 5 dispatches, and accelerate's
    # dispatch_model sets hf_device_map, only for a map over several devices or disk:
    # modeling_utils.py from_pretrained, accelerate/big_modeling.py).
    assert runner.device == "cuda:0"
    assert {str(t.device) for _, t in runner._tensors()} == {"cuda:0"}
    assert getattr(runner.model, "hf_device_map", None) is None and runner.movable()
    # the limit holds for the process: the allocator of every visible GPU is capped
    assert all(torch.cuda.get_per_process_memory_fraction(i) == 0.5
               for i in range(torch.cuda.device_count()))
    peaks = CudaPeaks()
    peaks.reset()
    peaks.new_window()
    runner.generate([GenerationRequest(runner.render("hello " * 200), 8)])
    assert peaks.window_peak() > 0
    assert peaks.job_peaks()["cuda:0"]["max_allocated"] > 0
    runner.close()
    torch.cuda.empty_cache()
    from backend.runners.hf.placement import cap_process_memory

    cap_process_memory(0.0)  # lift the cap for the tests that follow in this process
    assert torch.cuda.get_per_process_memory_fraction(0) == 1.0


_ALLOCATOR_REPORT = """
import json, sys
from backend.common.config import apply_allocator_settings, load_settings
apply_allocator_settings(load_settings())
import torch
a = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
b = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
segments = torch.cuda.memory_snapshot()
print(json.dumps({
    "settings": torch._C._accelerator_getAllocatorSettings(),
    "expandable": [s["is_expandable"] for s in segments if s["segment_type"] == "large"],
    "large_segments": torch.cuda.memory_stats()["segment.large_pool.current"]}))
"""


def _allocator_report(extra_env: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR_REPORT], cwd=ROOT, text=True,
                         capture_output=True, timeout=120, env={**env, **extra_env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
def test_worker_sets_expandable_segments_before_cuda():
    """What the allocator does, not what the environment says: with expandable
    segments the large-pool segments in torch.cuda.memory_snapshot() are expandable
    (their "is_expandable" and "segment_type" keys, torch/csrc/cuda/Module.cpp) and two
    64 MiB tensors grow one segment; with LBS_ENABLE_MEMORY_MANAGEMENT=0 each gets a
    cudaMalloc segment of its own."""
    on = _allocator_report({})
    assert "expandable_segments:True" in on["settings"]  # what the allocator parsed
    assert on["expandable"] and all(on["expandable"])
    assert on["large_segments"] == 1
    off = _allocator_report({"LBS_ENABLE_MEMORY_MANAGEMENT": "0"})
    assert off["expandable"] and not any(off["expandable"])
    assert off["large_segments"] == 2


@pytest.mark.gpu
def test_gpu_offload_drops_gpu_copy_and_restore_is_exact(settings, with_tiny):
    import torch

    from backend.engine.memory.entries import ManagerConfig
    from backend.engine.memory.manager import ModelManager

    spec = resolve_model("builtin:small", settings)
    manager = ModelManager(ManagerConfig.from_settings(settings))
    load = lambda: HFRunner.load(spec, LoadOptions.from_settings(settings), settings)  # noqa: E731
    prompt = None
    with manager.use("k", spec.name, load, CacheMode.CACHED, keep_on_gpu=lambda: False) as r:
        assert r.device.startswith("cuda")
        prompt = r.render("hello " * 50)
        before = r.generate([GenerationRequest(prompt, 8)])[0].text
        on_gpu = torch.cuda.memory_allocated()
    after_offload = torch.cuda.memory_allocated()
    assert on_gpu - after_offload > 0.9 * r.size_bytes()  # the GPU copy is gone
    assert r.host_pinned
    with manager.use("k", spec.name, load, CacheMode.CACHED, keep_on_gpu=lambda: False) as r2:
        assert r2 is r and r.device.startswith("cuda")
        assert r.generate([GenerationRequest(prompt, 8)])[0].text == before
    kinds = [e.kind for e in manager.events]
    assert kinds == ["load", "offload", "restore", "offload"]
    first, second = manager.events[1], manager.events[3]
    assert second.seconds < first.seconds  # later offloads only drop the GPU copy
    manager.release_all()


@pytest.fixture
def static_caches(monkeypatch):
    """max_cache_len of every StaticCache made (by transformers' generate or the runner)."""
    from transformers.cache_utils import StaticCache

    made: list[int] = []
    init = StaticCache.__init__

    def recording(self, *args, **kwargs):
        max_len = kwargs.get("max_cache_len", args[1] if len(args) > 1 else None)
        made.append(max_len)
        init(self, *args, **kwargs)

    monkeypatch.setattr(StaticCache, "__init__", recording)
    return made


def test_static_cache_is_sized_to_each_request(settings, with_tiny, static_caches):
    """transformers sizes a static cache to the longest length the model has ever seen
    (generation/utils.py _prepare_static_cache: max(max_cache_len,
    _previous_max_cache_length)); after a long prompt a short one must not get its size."""
    spec = resolve_model("builtin:tiny", settings)
    runner = HFRunner.load(spec, LoadOptions.from_settings(settings, "optimized"), settings)
    long = runner.render("word " * 1500)
    short = runner.render("Where is the library?")
    n_long, n_short = runner.count_prompt(long), runner.count_prompt(short)
    runner.generate([GenerationRequest(long, 4)])
    # the last token is never fed back, so a cache holds prompt + new tokens - 1
    assert static_caches and static_caches[-1] >= n_long + 3
    runner.generate([GenerationRequest(short, 4)])
    assert n_short + 3 <= static_caches[-1] <= max(2 * (n_short + 4), 256)
    assert static_caches[-1] < n_long


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_optimized_compiles_the_decode_step_only(settings, with_tiny, monkeypatch):
    """The optimized method goes through transformers' own compile path (its
    generation_config.compile_config: only the decode step with a static cache is
    compiled), so prompt lengths that share a cache size add no graph. Compiled here on
    the CPU with the eager backend (CompileConfig.backend; `_compile_all_devices` is
    transformers' switch for compiling off CUDA)."""
    import torch
    from transformers import CompileConfig

    from backend.runners.hf import loading

    configured = []
    configure = loading.configure_compile
    monkeypatch.setattr(loading, "configure_compile",
                        lambda model: (configured.append(model), configure(model))[1])
    torch.compiler.reset()
    spec = resolve_model("builtin:tiny", settings)
    runner = HFRunner.load(spec, LoadOptions.from_settings(settings, "optimized"), settings)
    assert configured == [runner.model], "the runner hands compiling to transformers"
    assert "forward" not in runner.model.__dict__, "the whole forward is not compiled"
    compile_config = runner.model.generation_config.compile_config
    if runner.device.startswith("cuda"):  # transformers' defaults: the decode step only
        assert isinstance(compile_config, CompileConfig)
        assert compile_config.mode == CompileConfig().mode
    else:  # on the CPU the runner asks for no compile (transformers would not compile)
        assert compile_config is None
    # the same path, forced on any device: transformers' switch for compiling off CUDA,
    # eager backend
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    runner.model.generation_config.compile_config = config
    basic = HFRunner.load(spec, LoadOptions.from_settings(settings, "basic"), settings)
    prompts = [runner.render("Where is the library? " * n) for n in (1, 3, 6)]
    assert len({runner.count_prompt(p) for p in prompts}) == 3
    expected = [basic.generate([GenerationRequest(p, 6)])[0].text for p in prompts]
    got, graphs = [], []
    for p in prompts:
        got.append(runner.generate([GenerationRequest(p, 6)])[0].text)
        graphs.append(_graphs())
    assert got == expected
    assert graphs[0] >= 1, "the decode step was compiled"
    assert graphs[1] == graphs[2] == graphs[0], f"new graphs per prompt length: {graphs}"
    assert hasattr(runner.model, "_compiled_call")
    # closing a runner that compiled resets torch.compile's caches (on CUDA that frees
    # the CUDA-graph pools too) and leaves nothing holding the model
    import gc
    import weakref

    resets = []
    reset = torch.compiler.reset
    monkeypatch.setattr(torch.compiler, "reset", lambda: (resets.append(1), reset())[1])
    basic.close()
    assert resets == [], "a runner that compiled nothing leaves other models' graphs alone"
    model = weakref.ref(runner.model)
    configured.clear()
    runner.close()
    gc.collect()
    assert resets == [1] and model() is None


def test_a_spilled_model_is_never_compiled(settings, with_tiny, tmp_path):
    """A device map that spills layers to the CPU or disk: transformers cannot run it
    compiled (generation/utils.py _valid_auto_compile_criteria), and the runner does not
    ask it to."""
    import torch
    from transformers import AutoModelForCausalLM

    from backend.runners.hf import loading

    spec = resolve_model("builtin:tiny", settings)
    source = loading.model_source(spec, settings)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, device_map={"model.embed_tokens": "cpu", "model.norm": "cpu",
                                                 "lm_head": "cpu", "model.rotary_emb": "cpu",
                                                 "model.layers.0": "cpu",
                                                 "model.layers.1": "disk"},
        offload_folder=str(tmp_path / "offload"))
    assert "disk" in model.hf_device_map.values()
    loading.configure_compile(model)
    assert model.generation_config.compile_config is None
    assert model.generation_config.disable_compile is True


def test_model_not_found_lists_what_there_is_and_suggests(settings, tmp_path, monkeypatch):
    """A mistyped model name is answered with the models there are and the nearest one:
    built-in, a folder under LBS_MODEL_DIRS, a hub id in the local cache."""
    from huggingface_hub import constants

    folder = tmp_path / "zoo" / "my-tiny"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    hub = tmp_path / "hub"
    (hub / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))

    with pytest.raises(ModelNotFound) as caught:
        resolve_model("my-tinyy", settings)
    message = str(caught.value)
    assert "did you mean 'my-tiny'?" in message
    assert "builtin:tiny" in message and "builtin:small" in message
    assert "Qwen/Qwen2.5-0.5B" in message
    with pytest.raises(ModelNotFound, match=r"did you mean 'builtin:tiny'\?"):
        resolve_model("builtin:tinyy", settings)
    with pytest.raises(ModelNotFound, match=r"did you mean 'Qwen/Qwen2.5-0.5B'\?"):
        resolve_model("qwen/qwen2.5-0.5b", settings)
    # from the command line (not confined) a folder is named by its path
    with pytest.raises(ModelNotFound, match=f"did you mean '{folder}'"):
        resolve_model("my-tinyy", settings, confine=False)


def test_unknown_dataset_suggests_the_near_name():
    from backend.datasets.registry import UnknownDataset, get_dataset

    with pytest.raises(UnknownDataset) as caught:
        get_dataset("GSM8K")
    assert "did you mean 'gsm8k'?" in str(caught.value)
    with pytest.raises(UnknownDataset) as caught:
        get_dataset("longbnech")
    assert "did you mean 'longbench'?" in str(caught.value)
