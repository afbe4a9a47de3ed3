"""`batch_size: "auto"` (HFRunner.find_batch_size): the batch the memory account says
fits in the room this process may still use, checked by one real step of the path that
will run, halving on an out-of-memory of any kind, the failed batch gone before the
device cache is emptied.

A real CUDA or cuBLAS out-of-memory cannot happen on the CPU: the model's forward
raises the texts torch raises (c10/cuda/CUDACachingAllocator.cpp, ATen/cuda/
CublasHandlePool.cpp's TORCH_CUDABLAS_CHECK, ATen/cudnn/Exceptions.h) for batches above
a limit."""

from __future__ import annotations

import weakref
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from backend.engine.contracts import BatchPlan
from backend.runners.hf import placement
from backend.runners.hf.account import cache_length
from backend.runners.hf.loading import LoadOptions
from backend.runners.hf.runner import HFRunner
from backend.runners.models import resolve_model

GiB = 1024**3

OOM_ERRORS = {
    "cuda": lambda: torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
        "79.19 GiB of which 1.06 GiB is free."),
    "cublas": lambda: RuntimeError(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    "cudnn": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    "python": lambda: MemoryError(),
}


@pytest.fixture
def runner(settings, with_tiny, monkeypatch):
    """The built-in model on the CPU, taking the real step CUDA takes: these tests
    raise CUDA's errors from its forward pass."""
    spec = resolve_model("builtin:tiny", settings)
    loaded = HFRunner.load(spec, LoadOptions.from_settings(settings), settings)
    monkeypatch.setattr(loaded, "steps_can_fail", lambda: True)
    return loaded


def test_on_the_cpu_the_account_decides_without_a_step(settings, with_tiny, monkeypatch):
    """RAM running out does not raise: on the CPU "auto" takes the most rows (up to
    CPU_MAX_BATCH) whose account fits half the available RAM, and runs no forward pass
    for it (a 64-row prefill took a minute, half a 200-question job)."""
    import psutil

    from backend.runners.hf.runner import CPU_MAX_BATCH

    spec = resolve_model("builtin:tiny", settings)
    cpu = HFRunner.load(spec, LoadOptions.from_settings(settings), settings)
    seen = forwards(cpu)
    assert cpu.find_batch_size(replace(GENERATE, rows=500)) == CPU_MAX_BATCH
    assert cpu.find_batch_size(GENERATE) == GENERATE.rows
    available = cpu.work_bytes(replace(GENERATE, rows=3)) * 2 + 1
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    assert cpu.find_batch_size(GENERATE) == 3
    assert seen == []


def forwards(runner, limit: int | None = None, error=None) -> list[dict]:
    """What each forward pass of `runner`'s model is given (rows, width, cache, whether
    a row is padded); with `limit`, passes over more rows raise `error()`."""
    seen: list[dict] = []

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append({"rows": ids.shape[0], "width": ids.shape[1], "cache": cache,
                     "use_cache": kwargs.get("use_cache"),
                     "padded": mask is not None and bool((mask == 0).any())})
        if limit is not None and ids.shape[0] > limit:
            raise error()
    runner.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


SCORE = BatchPlan("loglikelihood", 8, 40, 1)
GENERATE = BatchPlan("generate", 8, 40, 6)


@pytest.mark.parametrize("kind", sorted(OOM_ERRORS))
@pytest.mark.parametrize("plan", [SCORE, GENERATE], ids=["loglikelihood", "generate"])
def test_the_probe_halves_on_every_kind_of_out_of_memory(runner, kind, plan):
    """cuBLAS's and cuDNN's allocation failures are out-of-memory like CUDA's own
    (accelerate's should_reduce_batch_size knows neither: the job failed)."""
    seen = forwards(runner, limit=2, error=OOM_ERRORS[kind])
    assert runner.find_batch_size(plan) == 2
    assert [s["rows"] for s in seen if s["width"] > 1][:3] == [8, 4, 2]


def test_an_error_that_is_not_out_of_memory_is_raised(runner):
    forwards(runner, limit=2, error=lambda: RuntimeError("CUDA error: an illegal memory "
                                                         "access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        runner.find_batch_size(GENERATE)


def test_not_even_one_row_fitting_leaves_the_job_to_its_own_halving(runner):
    forwards(runner, limit=0, error=OOM_ERRORS["cuda"])
    assert runner.find_batch_size(SCORE) == 1


def test_the_generation_step_holds_the_cache_a_padded_mask_and_decodes(runner):
    """The step is what generate holds at its fullest: a left-padded prefill that keeps
    its KV cache, as long as the longest prompt plus the new tokens but the last,
    then a decode step on that cache (the probe used to be one cache-less forward of
    equal rows)."""
    seen = forwards(runner)
    assert runner.find_batch_size(GENERATE) == 8
    prefill, decode = seen[0], seen[1]
    assert prefill["rows"] == 8 and prefill["padded"]
    assert prefill["use_cache"] is not False and prefill["cache"] is not None
    assert prefill["width"] == GENERATE.prompt_tokens + GENERATE.new_tokens - 2
    assert decode["rows"] == 8 and decode["width"] == 1
    assert decode["cache"] is prefill["cache"]


def test_the_account_picks_the_batch_that_fits_the_room_left(runner, monkeypatch):
    """Where the process has a known room (on CUDA), the first real step already has
    the largest batch the account says fits: no halving through batches that cannot
    fit, and no step at all beyond `rows`."""
    room = runner.work_bytes(replace(GENERATE, rows=5)) + 1
    assert runner.work_bytes(replace(GENERATE, rows=6)) > room
    monkeypatch.setattr(runner, "room_bytes", lambda: room)
    seen = forwards(runner)
    assert runner.find_batch_size(GENERATE) == 5
    assert seen[0]["rows"] == 5
    # the account says even one row does not fit: one row, tried by the job itself
    monkeypatch.setattr(runner, "room_bytes", lambda: 1)
    seen.clear()
    assert runner.find_batch_size(GENERATE) == 1


def test_the_failed_batch_is_gone_before_the_cache_is_emptied(runner, monkeypatch):
    """empty_cache can only give back blocks nothing holds: the failed step's tensors,
    held by the exception's traceback while an except block runs, must be gone first.
    Checked before the gc.collect that clear_device_cache runs, so references alone."""
    import accelerate.utils.memory

    made: list[weakref.ref] = []
    real = runner._score

    def score(batch, share_prefix=True):
        held = torch.ones(len(batch), 1024)  # what the failed batch allocated
        made.append(weakref.ref(held))
        if len(batch) > 2:
            raise OOM_ERRORS["cuda"]()
        return real(batch, share_prefix)
    monkeypatch.setattr(runner, "_score", score)
    alive_at_clear: list[list[bool]] = []

    def clear(garbage_collection: bool = False):
        alive_at_clear.append([ref() is not None for ref in made])
    monkeypatch.setattr(accelerate.utils.memory, "clear_device_cache", clear)
    assert runner.find_batch_size(SCORE) == 2
    assert len(alive_at_clear) >= 2, "the cache is emptied after each failed batch"
    assert all(not any(alive) for alive in alive_at_clear), alive_at_clear


def test_room_is_what_the_cap_and_the_device_leave(monkeypatch):
    """On CUDA: min(the device's free memory plus what this process's allocator keeps
    unused, the LBS_GPU_MEMORY_LIMIT cap less what is allocated); None on the CPU."""
    state = {"free": 45 * GiB, "total": 80 * GiB, "allocated": 30 * GiB,
             "reserved": 32 * GiB, "fraction": 0.5}
    fake = SimpleNamespace(
        is_available=lambda: True,
        mem_get_info=lambda device=None: (state["free"], state["total"]),
        memory_allocated=lambda device=None: state["allocated"],
        memory_reserved=lambda device=None: state["reserved"],
        get_per_process_memory_fraction=lambda device=None: state["fraction"])
    monkeypatch.setattr(torch, "cuda", fake)
    assert placement.room_bytes(["cuda:0"]) == 40 * GiB - 30 * GiB  # the cap binds
    state["fraction"], state["free"] = 1.0, 5 * GiB
    assert placement.room_bytes(["cuda:0"]) == 5 * GiB + 2 * GiB  # the device binds
    assert placement.room_bytes(["cuda:0", "cuda:1"]) == 2 * 7 * GiB  # layers shared out
    assert placement.room_bytes([]) is None


def test_auto_batch_size_plans_the_jobs_longest_batch():
    """The probe is asked for the batch the job will run: a generation job's longest
    prompt and its most new tokens, a multiple-choice job's longest context and
    continuation, at most the items there are."""
    from backend.engine.answering import auto_batch_size

    asked = []
    fake = SimpleNamespace(find_batch_size=lambda plan: (asked.append(plan), 3)[1],
                           encode=lambda text: text.split())
    items = [SimpleNamespace(prompt_tokens=n, max_new_tokens=new, choices=None)
             for n, new in ((100, 8), (300, 4), (50, 32))]
    assert auto_batch_size(fake, items) == 3
    assert asked[-1] == BatchPlan("generate", 3, 300, 32, padded=True)
    items = [SimpleNamespace(prompt_tokens=n, prompt="Q: which?\nAnswer:",
                             choices=["A", "the river bank"]) for n in (60, 90)]
    auto_batch_size(fake, items)
    # each row continues its context once per choice past one token
    assert asked[-1] == BatchPlan("loglikelihood", 2, 90, 3, padded=True, continuations=2)


@pytest.mark.parametrize("method", ["default", "optimized"])
@pytest.mark.parametrize("plan", [BatchPlan("generate", 4, 120, 8),
                                  BatchPlan("loglikelihood", 4, 120, 3, continuations=8)],
                         ids=["generate", "loglikelihood"])
def test_the_step_holds_what_the_account_of_its_batch_says(settings, with_tiny, method,
                                                           plan):
    """The census oracle (tests/memory_census.py) on the probe's step: its peak beyond
    the weights within the account of the batch it runs, the account within 1.3x. A
    generation step prefills the prompt and the new tokens but the last, then decodes
    one token: the batch (prompt + new - 2, 2 new tokens), every moment at least as
    large as the job's own batch."""
    from tests.memory_census import StorageCensus

    spec = resolve_model("builtin:tiny", settings)
    runner = HFRunner.load(spec, LoadOptions.from_settings(settings, method), settings)
    ran = plan
    if plan.kind == "generate":
        ran = replace(plan, prompt_tokens=plan.prompt_tokens + plan.new_tokens - 2,
                      new_tokens=2)
    with StorageCensus(runner.model) as census:
        runner._probe_step(plan)
    account = runner.work_bytes(ran)
    assert census.peak_bytes <= account <= 1.3 * census.peak_bytes, (
        census.peak_bytes, account, census.where)
    if method == "optimized" and plan.kind == "generate":  # the job's first batch's cache
        assert runner._static[0] == (plan.rows, cache_length(
            plan.prompt_tokens + plan.new_tokens - 1))
