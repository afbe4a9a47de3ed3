"""Out of memory during a job: the batch halves down to one prompt, a prompt that does not
fit alone becomes a failed sample (or fails the job), and every OOM event is stored.

The runner is the real HF runner on the built-in model; only its `generate` is wrapped
to raise the real out-of-memory exception types at chosen batch sizes or prompt lengths.
"""

from __future__ import annotations

import pytest
import torch

from backend.engine.answering import Backoff
from backend.engine.contracts import OomFailure, is_out_of_memory
from backend.queue import jobs
from backend.queue.db import JobState
from backend.runners.hf.runner import HFRunner
from tests.conftest import queue_on, work_one_job

NIAH = "needle_in_haystack"
GRID = {"context_lengths": [256, 512], "depth_percents": [0, 25, 50, 75, 100],
        "max_new_tokens": 4}


def _cuda_oom(message="CUDA out of memory. Tried to allocate 2.00 GiB"):
    return torch.cuda.OutOfMemoryError(message)


@pytest.fixture
def oom_when(monkeypatch):
    """Make HFRunner.generate raise `error()` for batches that `too_big(requests, runner)`
    says do not fit; records every batch size it was called with."""
    calls: list[int] = []
    real = HFRunner.generate

    def install(too_big, error=_cuda_oom):
        def generate(self, requests):
            calls.append(len(requests))
            if too_big(requests, self):
                raise error()
            return real(self, requests)
        monkeypatch.setattr(HFRunner, "generate", generate)
        return calls
    return install


def _run(settings, factory, params):
    (job_id,) = [j.id for j in queue_on(factory).submit([jobs.NewJob("builtin:tiny", NIAH,
                                                                      params)])]
    work_one_job(settings)
    samples, _ = queue_on(factory).samples(job_id)
    return queue_on(factory).get(job_id), samples


def test_batch_halves_on_cuda_oom_and_the_job_completes(settings, factory, with_tiny, oom_when):
    reference, ref_samples = _run(settings, factory, {**GRID, "batch_size": 1})
    calls = oom_when(lambda requests, runner: len(requests) > 2)
    job, samples = _run(settings, factory, {**GRID, "batch_size": 8})

    assert job.state == JobState.SUCCEEDED.value, job.error
    assert [s.idx for s in samples] == list(range(10))  # one row per sample, none failed
    assert all(s.error is None for s in samples)
    # 8 fails, 4 fails, then pairs for the rest of the job (the halved size sticks).
    assert calls == [8, 4, 2, 2, 2, 2, 2]
    ooms = [e for e in job.events if e["kind"] == "oom"]
    assert [e["note"].split(":")[0] for e in ooms] == ["batch size 8", "batch size 4"]
    assert "OutOfMemoryError: CUDA out of memory" in ooms[0]["note"]
    # Batching changes nothing in the answers.
    assert [s.prediction for s in samples] == [s.prediction for s in ref_samples]
    assert job.scores[0].value == reference.scores[0].value


def test_a_prompt_too_big_alone_is_a_failed_sample(settings, factory, with_tiny, oom_when):
    oom_when(lambda requests, runner: any(runner.count_prompt(r.prompt) > 400
                                          for r in requests),
             error=lambda: MemoryError())
    job, samples = _run(settings, factory, {**GRID, "batch_size": 4})

    assert job.state == JobState.SUCCEEDED.value
    assert len(samples) == 10
    failed = [s for s in samples if s.error]
    assert {s.fields["context_length"] for s in failed} == {512}
    assert len(failed) == 5
    assert all("out of memory even alone: MemoryError" in s.error for s in failed)
    assert all(s.score == 0.0 and s.prediction == "" for s in failed)
    assert all(s.error is None for s in samples if s.fields["context_length"] == 256)
    assert job.scores[0].count == 10  # failed samples count, as zeros
    assert any(e["kind"] == "oom" and "one prompt alone" in e["note"] for e in job.events)


def test_on_oom_fail_job_fails_with_the_reason_and_keeps_the_events(
        settings, factory, with_tiny, oom_when):
    oom_when(lambda requests, runner: any(runner.count_prompt(r.prompt) > 400
                                          for r in requests),
             error=lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] "
                                        "DefaultCPUAllocator: can't allocate memory"))
    job, samples = _run(settings, factory, {**GRID, "batch_size": 1, "on_oom": "fail_job"})

    assert job.state == JobState.FAILED.value
    assert "does not fit in memory even alone" in job.error and "fail_job" in job.error
    assert "DefaultCPUAllocator" in job.error
    assert [s.idx for s in samples] == list(range(5))  # the 256-token samples before it
    assert [e["kind"] for e in job.events].count("oom") == 1


def test_other_errors_are_not_taken_for_oom(settings, factory, with_tiny, oom_when):
    calls = oom_when(lambda requests, runner: True,
                     error=lambda: RuntimeError("shape mismatch in attention"))
    job, samples = _run(settings, factory, {**GRID, "batch_size": 4})
    assert job.state == JobState.FAILED.value
    assert job.error == "RuntimeError: shape mismatch in attention"
    assert calls == [4] and samples == []  # not retried


def test_backoff_unit():
    seen = []
    backoff = Backoff(4, lambda size, message: seen.append(size))

    def fn(batch):
        if len(batch) > 1 or batch[0] == "huge":
            raise _cuda_oom()
        return [x.upper() for x in batch]

    out = backoff.run(fn, ["a", "huge", "b", "c", "d"])
    assert out[:1] == ["A"] and isinstance(out[1], OomFailure) and out[2:] == ["B", "C", "D"]
    assert seen == [4, 2, 1] and backoff.size == 1
    assert is_out_of_memory(_cuda_oom()) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("index out of range"))
    assert not is_out_of_memory(ValueError("out of memory"))
