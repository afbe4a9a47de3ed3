"""The evaluation loop shared by the worker and the CLI.

`prepare` turns what a user submitted (model name, dataset name, raw params)
into a `PreparedJob`, refusing anything wrong before a model loads; it does not
import torch, so the server calls it at submit time. `run_evaluation` loads the
model through the model manager, builds the dataset's items in the model's
tokens, generates and scores every item not yet stored, hands each result to a
`SampleSink` as soon as it is scored, and returns the scores and memory peaks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend.config import Settings
from backend.datasets.base import Dataset, DatasetParams, ModelInfo, ScoreEntry
from backend.datasets.registry import get_dataset
from backend.memory.manager import ModelManager
from backend.runners.base import GenerationRequest
from backend.runners.models import ModelSpec, model_info, resolve_model

log = logging.getLogger(__name__)


@dataclass
class PreparedJob:
    spec: ModelSpec
    info: ModelInfo
    dataset: Dataset
    params: DatasetParams


def prepare(model: str, dataset: str, raw_params: dict[str, Any] | None,
            settings: Settings) -> PreparedJob:
    """Resolve and check a job without loading anything.

    Raises UnknownDataset, ModelNotFound, pydantic.ValidationError or ParamError.
    """
    ds = get_dataset(dataset)
    ds.datasets_dir = settings.datasets_dir
    params = ds.parse_params(raw_params)
    spec = resolve_model(model, settings)
    info = model_info(spec)
    ds.check(params, info)
    return PreparedJob(spec, info, ds, params)


@dataclass
class SampleRecord:
    """A scored item, as stored (one row of `samples`)."""

    idx: int
    prompt: str
    prompt_tokens: int
    prediction: str
    score: float
    latency_s: float
    output_tokens: int
    fields: dict[str, Any]
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    error: str | None = None


class SampleSink(Protocol):
    """Where results go: the database for a worker, a list for the CLI."""

    def stored(self) -> dict[int, tuple[dict[str, Any], float]]:
        """Samples already stored for this job (a resumed job): idx -> (fields, score)."""

    def set_total(self, total: int) -> None:
        """The job has `total` items."""

    def write(self, record: SampleRecord) -> bool:
        """Store one result; False asks the loop to stop (the job was cancelled)."""


@dataclass
class EvalOutcome:
    scores: list[ScoreEntry]
    memory: list[tuple[str, str, int]]
    """(name, device, bytes) readings: rss_peak, rss_at_load, cuda max_allocated…"""
    events: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False


def _choose(runner: Any, item: Any) -> tuple[str, int, int, dict[str, Any]]:
    """Multiple choice by log-likelihood: the label of the likeliest continuation, the
    prompt's token count, 0 generated tokens, and the fields with each choice's log-prob."""
    from backend.runners.base import LoglikelihoodRequest

    scored = runner.loglikelihood([LoglikelihoodRequest(item.prompt, c) for c in item.choices])
    labels = item.labels or item.choices
    best = max(range(len(scored)), key=lambda i: scored[i].logprob)
    fields = {**item.fields, "logprobs": {label: round(s.logprob, 4)
                                          for label, s in zip(labels, scored, strict=True)}}
    return labels[best], runner.count_prompt(item.prompt), 0, fields


def model_key(spec: ModelSpec, settings: Settings) -> tuple:
    """What makes two loaded models different (the model manager's cache key)."""
    from backend.runners.hf import LoadOptions

    return (spec.name, str(spec.path), "hf", LoadOptions.from_settings(settings))


def run_evaluation(job: PreparedJob, manager: ModelManager, settings: Settings,
                   sink: SampleSink,
                   keep_on_gpu: Callable[[], bool] | None = None) -> EvalOutcome:
    """Evaluate `job`; raises whatever loading or generation raises.

    `keep_on_gpu` tells the model manager, after the job, whether the next job
    needs the same model (then a cached model stays on the GPU).
    """
    from backend.memory.tracker import CudaPeaks, PeakSampler, rss_bytes
    from backend.runners.hf import HFRunner, LoadOptions
    from backend.runners.models import estimate_model_bytes

    sampler = PeakSampler().start()
    cuda = CudaPeaks()
    cuda.reset()
    memory: list[tuple[str, str, int]] = [("rss_before_load", "cpu", rss_bytes())]
    first_event = manager.event_count
    stopped = False
    stored = sink.stored()
    results = dict(stored)
    options = LoadOptions.from_settings(settings)
    try:
        with manager.use(model_key(job.spec, settings), job.spec.name,
                         lambda: HFRunner.load(job.spec, options, settings),
                         job.dataset.cache_mode,
                         estimate=estimate_model_bytes(job.spec, options.dtype),
                         keep_on_gpu=keep_on_gpu) as runner:
            memory.append(("rss_at_load", "cpu", rss_bytes()))
            if not getattr(job.params, "use_chat_template", True):
                runner = runner.without_chat_template()
            items = job.dataset.build_items(job.params, runner)
            sink.set_total(len(items))
            for item in items:
                if item.idx in stored:
                    continue
                sampler.new_window()
                cuda.new_window()
                started = time.perf_counter()
                fields = item.fields
                if item.choices:
                    text, prompt_tokens, output_tokens, fields = _choose(runner, item)
                else:
                    generation = runner.generate(
                        [GenerationRequest(item.prompt, item.max_new_tokens)])[0]
                    text, prompt_tokens = generation.text, generation.prompt_tokens
                    output_tokens = generation.output_tokens
                    follow = getattr(job.dataset, "second_turn", None)
                    nxt = follow(item, text, runner) if follow else None
                    if nxt is not None:  # e.g. chain of thought, then the answer turn
                        second = runner.generate(
                            [GenerationRequest(nxt.prompt, nxt.max_new_tokens)])[0]
                        text, fields = second.text, nxt.fields
                        output_tokens += second.output_tokens
                score = job.dataset.score(item, text)
                record = SampleRecord(
                    idx=item.idx, prompt=item.prompt, prompt_tokens=prompt_tokens,
                    prediction=text, score=score,
                    latency_s=round(time.perf_counter() - started, 6),
                    output_tokens=output_tokens, fields=fields,
                    peak_rss_bytes=sampler.window_peak(), peak_gpu_bytes=cuda.window_peak())
                results[item.idx] = (fields, score)
                if not sink.write(record):
                    stopped = True
                    break
        memory.append(("rss_after_job", "cpu", rss_bytes()))
    finally:
        memory.append(("rss_peak", "cpu", sampler.stop()))
    for device, peaks in cuda.job_peaks().items():
        memory.append(("cuda_max_allocated", device, peaks["max_allocated"]))
        memory.append(("cuda_max_reserved", device, peaks["max_reserved"]))
    if cuda.nvml_peak is not None:  # sampled at sample boundaries, CUDA context included
        memory.append(("cuda_nvml_process_used", "cuda:all", cuda.nvml_peak))
    scores = job.dataset.aggregate([results[i] for i in sorted(results)])
    events = [e.as_dict() for e in manager.events_since(first_event)]
    return EvalOutcome(scores=scores, memory=memory, events=events, stopped=stopped)
