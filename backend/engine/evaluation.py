"""The evaluation loop shared by the worker and the CLI.

`run_evaluation` runs a `PreparedJob` (engine/preparation.py): it loads the
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

from backend.common.config import Settings
from backend.common.stats import binomial
from backend.datasets.base import Dataset, ScoreEntry
from backend.datasets.files import recording_reads
from backend.engine.answering import (
    Backoff,
    BatchTrial,
    answer_batch,
    auto_batch_size,
    choose,
    default_batch_size,
    order_for_batching,
)
from backend.engine.contracts import CacheMode, GenerationRequest
from backend.engine.manifest import build_manifest
from backend.engine.memory.manager import ModelManager
from backend.engine.preparation import PreparedJob
from backend.runners.base import PromptView

log = logging.getLogger(__name__)


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
    peak_own_rss_bytes: int | None = None
    """The sample's RSS peak above the job's baseline (see run_evaluation)."""


class SampleSink(Protocol):
    """Where results go: the database for a worker, a list for the CLI."""

    def stored(self) -> dict[int, tuple[dict[str, Any], float]]:
        """Samples already stored for this job (a resumed job): idx -> (fields, score)."""

    def set_total(self, total: int) -> None:
        """The job has `total` items."""

    def set_manifest(self, manifest: dict[str, Any]) -> None:
        """What the job runs with (backend.engine.manifest), once its model is loaded."""

    def write(self, record: SampleRecord) -> bool:
        """Store one result; False asks the loop to stop (the job was cancelled)."""


@dataclass
class EvalOutcome:
    scores: list[ScoreEntry]
    memory: list[tuple[str, str, int]]
    """(name, device, bytes) readings: rss_peak (the process's), rss_own_peak (the job's
    own, above rss_baseline), rss_at_load, cuda max_allocated…"""
    events: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False


class SampleOutOfMemory(RuntimeError):
    """One prompt alone did not fit in memory and the job asked to fail (on_oom=fail_job)."""


def _oom_handler(manager: ModelManager, job: PreparedJob) -> Callable[[int, str], None]:
    def handle(batch: int, message: str) -> None:
        what = (f"batch of {batch} did not fit; retrying with {max(1, batch // 2)}"
                if batch > 1 else "one prompt alone did not fit")
        log.warning("[Runner] out of memory on %s: %s (%s)", job.spec.name, what, message)
        manager.record_oom(job.spec.name, f"batch size {batch}: {what}; {message}")
    return handle


def run_evaluation(job: PreparedJob, manager: ModelManager, settings: Settings,
                   sink: SampleSink,
                   keep_on_gpu: Callable[[], bool] | None = None) -> EvalOutcome:
    """Evaluate `job`; raises whatever loading or generation raises.

    `keep_on_gpu` tells the model manager, after the job, whether the next job
    needs the same model (then a cached model stays on the GPU).

    With `methods` (a comparison) the job makes one pass per method over the same
    items: the model is loaded with that method, every item answered, and the model
    released (the release checked by the memory tracker) before the next method
    loads. Pass k stores item i as sample k * n + i with the method in its fields.

    RSS is the whole worker's: libraries an earlier job imported, models other jobs left
    warm and heap the allocator kept all count in it, so the process's peak (`rss_peak`)
    depends on what ran before. The job's own peak (`rss_own_peak`, and each sample's
    `peak_own_rss_bytes`) is measured above `rss_baseline`: the worker's RSS without
    the job's model, the higher of the RSS before the job and the RSS once the model is
    loaded, each less the RAM the model's weights took then (HeldModel.ram_bytes; 0
    before a cold load). It counts the weights whether this job loaded them or found them
    warm, and leaves out the libraries a first load imports, which the worker keeps for
    every later job (unless the weights, read lazily from their files, are not in RAM
    yet when the load returns and weigh more than those libraries).
    """
    from backend.engine.memory.tracker import CudaPeaks, PeakSampler, rss_bytes

    sampler = PeakSampler().start()
    cuda = CudaPeaks()
    cuda.reset()
    memory: list[tuple[str, str, int]] = [("rss_before_load", "cpu", rss_bytes())]
    baseline: list[int] = []  # per pass: the worker's RSS without this job's model
    first_event = manager.event_count
    stopped = False
    stored = sink.stored()
    results = dict(stored)
    methods: list[str | None] = list(job.params.methods or []) or [None]
    manifest: dict[str, Any] = {}

    def note_batch_size(note: dict[str, Any]) -> None:
        """batch_size "auto"'s choice and reason, into the job's manifest."""
        if manifest:
            manifest["inference"]["batch_size"] = note
            sink.set_manifest(manifest)

    try:
        for k, method in enumerate(methods):
            key, load, estimate = _loader(job, settings, method)
            cache_mode = job.dataset.cache_mode if method is None else CacheMode.UNCACHED
            before, warm = rss_bytes(), manager.ram_bytes(key)
            with manager.use(key, job.spec.name, load, cache_mode, estimate=estimate,
                             keep_on_gpu=keep_on_gpu) as runner:
                at_load = rss_bytes()
                memory.append(("rss_at_load" if k == 0 else f"rss_at_load_{method}", "cpu",
                               at_load))
                # A load's imports raise RSS for good (counted from at_load); weights
                # read lazily from their files may not be in RSS yet (counted from before)
                baseline.append(max(before - warm, at_load - runner.ram_bytes(), 0))
                runner.should_stop = job.should_stop  # a cached runner serves one job at a time
                # The job's chat-template choice travels with each request; a view of
                # the runner (never a copy holding the model) renders the prompts, so
                # the manager's release at the end of this block frees the weights.
                view = PromptView(runner, job.dataset.chat_template(job.params))
                with recording_reads() as data_files:
                    items = job.dataset.build_items(job.params, view)
                if k == 0:
                    manifest.update(build_manifest(job, runner, method, data_files))
                    sink.set_manifest(manifest)
                sink.set_total(len(items) * len(methods))
                offset = k * len(items)
                if job.shard is not None:  # this worker's share of a data-parallel job
                    items = [i for i in items if i.idx % job.shard[1] == job.shard[0]]
                    if not items:
                        continue
                try:
                    stopped = _run_items(job, manager, view, items, offset, method, stored,
                                         results, sink, sampler, cuda, min(baseline),
                                         note_batch_size)
                finally:  # a shared prefix's cache is this pass's, not the cached model's
                    runner.forget_prefixes()
            if stopped:
                break
        memory.append(("rss_after_job", "cpu", rss_bytes()))
    finally:
        peak = sampler.stop()
        memory.append(("rss_peak", "cpu", peak))
        if baseline:  # the leanest the worker was without this job's model
            memory += [("rss_baseline", "cpu", min(baseline)),
                       ("rss_own_peak", "cpu", max(0, peak - min(baseline)))]
    for device, peaks in cuda.job_peaks().items():
        memory.append(("cuda_max_allocated", device, peaks["max_allocated"]))
        memory.append(("cuda_max_reserved", device, peaks["max_reserved"]))
    memory += cuda.nvml_readings()
    if methods == [None]:
        scores = job.dataset.aggregate([results[i] for i in sorted(results)])
    else:
        scores = compare_methods(job.dataset, [m for m in methods if m], results)
    events = [e.as_dict() for e in manager.events_since(first_event)]
    return EvalOutcome(scores=scores, memory=memory, events=events, stopped=stopped)


def _loader(job: PreparedJob, settings: Settings, method: str | None
            ) -> tuple[tuple, Callable[[], Any], int]:
    """The model manager's key, the load function and the size estimate for `job`,
    from the job's runner (Runner.cache_key, .loader, .load_estimate)."""
    runner = job.runner
    return (runner.cache_key(job, settings, method), runner.loader(job, settings, method),
            runner.load_estimate(job, settings, method))


def _warm_up(view: PromptView, items: list[Any], method: str) -> None:
    """One untimed answer before a method's timed pass, so first-call costs (kernel
    selection, thread pools, torch.compile) do not count against whichever runs first.
    `items` are the first batch the timed pass answers, with their whole token budget:
    the optimized method's static cache then has the size that batch needs, and on CUDA
    the decode step's compiled graphs are those it replays (a shorter warm-up landed in
    another cache size for most prompts under 1k tokens)."""
    started = time.perf_counter()
    if items[0].choices:
        choose(view.runner, items[0], view.chat_template)
    else:
        view.runner.generate([GenerationRequest(item.prompt, item.max_new_tokens,
                                                view.chat_template) for item in items])
    log.info("[Runner] %s warm-up took %.2f s", method, time.perf_counter() - started)


def _run_items(job: PreparedJob, manager: ModelManager, view: PromptView, items: list[Any],
               offset: int, method: str | None, stored: dict, results: dict,
               sink: SampleSink, sampler: Any, cuda: Any, baseline: int,
               note_batch_size: Callable[[dict[str, Any]], None]) -> bool:
    """Answer and store every item not stored yet; True if the sink asked to stop.
    Each sample's own RSS peak is its peak above `baseline` (run_evaluation's).
    batch_size "auto" is chosen by `BatchTrial` on the first batches, and its choice
    and reason go to `note_batch_size` (the job's manifest)."""
    pending = [item for item in items if item.idx + offset not in stored]
    pending = order_for_batching(pending, longest_first=job.dataset.length_sorted)
    step, trial = default_batch_size(job.params, view.runner, items), None
    if step == "auto":
        trial = BatchTrial(auto_batch_size(view.runner, pending),
                           by_default=job.params.batch_size != "auto")
        step = trial.fits
    if method is not None and pending:
        _warm_up(view, pending[:step if trial is None else 1], method)
    backoff = Backoff(step, _oom_handler(manager, job))
    first = 0
    while first < len(pending):
        if job.should_stop():  # cancelled (or timed out) before this batch
            return True
        if trial is not None:
            trial.cap(backoff.size)
        size = step if trial is None else trial.next_size()
        batch = pending[first:first + size]
        first += len(batch)
        sampler.new_window()
        cuda.new_window()
        started = time.perf_counter()
        answers = answer_batch(batch, view, job.dataset, backoff)
        took = time.perf_counter() - started
        if trial is not None and trial.chosen is None:
            trial.record(size, batch, took)
            if trial.chosen is not None or first >= len(pending):
                note_batch_size(trial.note())
        latency = round(took / len(answers), 6)
        peak_rss, peak_gpu = sampler.window_peak(), cuda.window_peak()
        for a in answers:
            if a.error and job.params.on_oom == "fail_job":
                raise SampleOutOfMemory(
                    f"sample {a.item.idx + offset} does not fit in memory even alone "
                    f"({a.error}); the job asked on_oom=fail_job")
            score = 0.0 if a.error else job.dataset.score_answer(a.item, a.text, a.fields)
            fields = {**a.fields, **job.dataset.explain(a.item, a.text)}
            if method is not None:  # what the comparison reads back, also after a resume
                fields = {**fields, "method": method, "item": a.item.idx, "prediction": a.text,
                          "prompt_tokens": a.prompt_tokens, "output_tokens": a.output_tokens,
                          "latency_s": latency, "peak_rss_bytes": peak_rss,
                          "peak_own_rss_bytes": max(0, peak_rss - baseline),
                          "peak_gpu_bytes": peak_gpu}
            record = SampleRecord(
                idx=a.item.idx + offset, prompt=a.item.prompt, prompt_tokens=a.prompt_tokens,
                prediction=a.text, score=score, latency_s=latency,
                output_tokens=a.output_tokens, fields=fields,
                peak_rss_bytes=peak_rss, peak_own_rss_bytes=max(0, peak_rss - baseline),
                peak_gpu_bytes=peak_gpu,
                error=f"out of memory even alone: {a.error}" if a.error else None)
            results[a.item.idx + offset] = (fields, score)
            if not sink.write(record):
                return True
    return False


def compare_methods(dataset: Dataset, methods: list[str],
                    results: dict[int, tuple[dict[str, Any], float]]) -> list[ScoreEntry]:
    """Scores of a comparison job: the dataset's own scores for the first method, one
    `method` entry per method (score, tokens/s of prefill and decode, mean latency,
    peak memory) and `agreement`, the share of items where the methods answered alike."""
    by_method: dict[str, dict[int, tuple[dict[str, Any], float]]] = {m: {} for m in methods}
    for fields, score in results.values():
        if fields.get("method") in by_method:
            by_method[fields["method"]][fields["item"]] = (fields, score)
    first = by_method[methods[0]]
    scores = dataset.aggregate([first[i] for i in sorted(first)])
    for method in methods:
        rows = [f for f, _ in by_method[method].values()]
        values = [s for _, s in by_method[method].values()]
        timings = [(f, f.get("timing")) for f in rows if f.get("timing")]
        prefill_s = sum(t["prefill_s"] / t["batch"] for _, t in timings)
        decode_s = sum(t["decode_s"] / t["batch"] for _, t in timings)
        decoded = sum(max(f["output_tokens"] - 1, 0) for f, _ in timings)
        prompt = sum(t["prefill_tokens"] / t["batch"] for _, t in timings)
        peaks_gpu = [f["peak_gpu_bytes"] for f in rows if f.get("peak_gpu_bytes")]
        scores.append(ScoreEntry.mean("method", values, {
            "method": method,
            "prefill_tokens_per_s": round(prompt / prefill_s, 1) if prefill_s else None,
            "decode_tokens_per_s": round(decoded / decode_s, 1) if decode_s else None,
            "latency_s_mean": round(sum(f["latency_s"] for f in rows) / len(rows), 6)
            if rows else None,
            "peak_rss_mb": round(max((f.get("peak_rss_bytes") or 0 for f in rows),
                                     default=0) / 2**20, 1),
            "peak_own_rss_mb": round(max((f.get("peak_own_rss_bytes") or 0 for f in rows),
                                         default=0) / 2**20, 1),
            "peak_gpu_mb": round(max(peaks_gpu) / 2**20, 1) if peaks_gpu else None}))
    common = set.intersection(*(set(by_method[m]) for m in methods))
    if len(methods) > 1 and common:
        same = sum(len({by_method[m][i][0]["prediction"] for m in methods}) == 1 for i in common)
        scores.append(ScoreEntry.spread("agreement", same / len(common), len(common),
                                        binomial(same, len(common))))
    return scores
