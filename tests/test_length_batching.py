"""Length-aware batching of generation datasets: the items go longest first in batches of
neighbours, `batch_size: "auto"` starts large and halves on out-of-memory (the first,
longest batch is the probe), and the results are stored in the original order with the
answers of batch size 1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backend.queue import jobs
from backend.queue.db import JobState
from backend.runners.hf.runner import HFRunner
from tests.conftest import ROOT, queue_on, work_one_job

PARAMS = {"max_length": 300, "use_chat_template": False,
          "subsets": ["hotpotqa", "trec", "passage_count", "multifieldqa_zh"]}


@pytest.fixture
def recorded(monkeypatch):
    """Every generate call's prompt lengths; batches above `limit` raise CUDA's OOM."""
    calls: list[list[int]] = []
    limit = {"n": None}
    real = HFRunner.generate

    def generate(self, requests):
        calls.append([self.count_prompt(r.prompt, r.chat_template) for r in requests])
        if limit["n"] is not None and len(requests) > limit["n"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")
        return real(self, requests)
    monkeypatch.setattr(HFRunner, "generate", generate)
    return calls, limit


def _run(settings, factory, params):
    settings = dataclasses.replace(settings, datasets_dir=ROOT / "tests" / "fixtures")
    (job,) = queue_on(factory).submit([jobs.NewJob("builtin:tiny", "longbench", params)])
    work_one_job(settings)
    return queue_on(factory).get(job.id), queue_on(factory).samples(job.id)[0]


def test_longest_first_auto_batches_and_original_order(settings, factory, with_tiny,
                                                       recorded):
    calls, limit = recorded
    reference, ref_samples = _run(settings, factory, {**PARAMS, "batch_size": 1})
    assert reference.state == JobState.SUCCEEDED.value, reference.error
    lengths = [c[0] for c in calls]
    assert lengths == sorted(lengths, reverse=True)  # longest first, one at a time
    n = len(ref_samples)
    assert n >= 4

    calls.clear()
    limit["n"] = 2  # a batch of more than two prompts does not fit
    job, samples = _run(settings, factory, {**PARAMS, "batch_size": "auto"})
    assert job.state == JobState.SUCCEEDED.value, job.error
    # "auto": every prompt fits the probe (model.generate, not recorded here); the
    # first prompt alone settles, then sizes 1, 4, ... are timed on the next ones,
    # longest first; a batch of more than two halves, and the halved size stays
    sizes = [len(c) for c in calls]
    assert sizes[:2] == [1, 1]
    failed = [i for i, size in enumerate(sizes) if size > 2]
    assert all(size <= 2 for size in sizes[failed[0] + 1:] if failed)
    assert sum(sizes) == n + sum(sizes[i] for i in failed)  # each prompt answered once
    flat = [length for c in calls if len(c) <= 2 for length in c]
    assert flat == sorted(flat, reverse=True)  # neighbours in length batched together
    assert [s.idx for s in samples] == list(range(n))  # stored in the original order
    assert [s.prediction for s in samples] == [s.prediction for s in ref_samples]
    assert job.scores[0].value == reference.scores[0].value
    ooms = [e for e in job.events if e["kind"] == "oom"]
    assert len(ooms) == len(failed)
    for oom, i in zip(ooms, failed, strict=True):
        assert oom["note"].startswith(f"batch size {sizes[i]}")


def test_auto_batch_size_is_checked(client):
    for bad in ("big", 0, 257):
        res = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": "gsm8k",
                                             "params": {"batch_size": bad}})
        assert res.status_code == 422, bad
        assert any("batch_size" in d["field"] for d in res.get_json()["error"]["details"])
