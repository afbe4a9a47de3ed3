"""Results across jobs: the leaderboard (models x datasets with score, memory, speed),
memory against context length, and a rough duration for a job before it is launched.

Read-only queries over the jobs, scores, memory_peaks and samples tables; no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.queue.db import Job, JobState, MemoryPeak, Sample, Score, utcnow

MAX_JOBS = 2000
"""The leaderboard reads at most this many of the newest finished jobs."""

LENGTH_DATASETS = ("needle_in_haystack", "longbench")
"""Datasets whose samples span context lengths: the memory-versus-length chart."""


def model_identity(name: str, resolve: Callable[[str], Path | None]) -> tuple[str, str]:
    """(key, display name) of a model as jobs named it. A checkpoint folder named by
    its absolute path and by its name under LBS_MODEL_DIRS resolves to one folder, so
    both get one key; the display name is the folder's name. `resolve` gives the folder
    of a name (None when it cannot: a model since removed, a hub id not cached)."""
    if name.startswith(("builtin:", "openai:")):
        return name, name
    try:
        folder = resolve(name)
    except Exception:  # noqa: BLE001 - any failure means "not resolvable now"
        folder = None
    if folder is not None:
        return str(folder), folder.name
    stripped = name.rstrip("/")
    if stripped.startswith(("/", ".", "~")):  # a folder that is gone: its name
        return Path(stripped).name, Path(stripped).name
    return stripped, stripped


def _peaks(session: Any, ids: list[int]) -> dict[int, dict[str, int]]:
    """Per job: `gpu` (the allocator's reserved peak summed over devices, else what NVML
    saw for the process) and `rss` (the process's peak resident memory), in bytes."""
    out: dict[int, dict[str, int]] = {i: {} for i in ids}
    nvml: dict[int, int] = {}
    for row in session.execute(sa.select(MemoryPeak.job_id, MemoryPeak.name, MemoryPeak.bytes)
                               .where(MemoryPeak.job_id.in_(ids))):
        if row.name == "rss_peak":
            out[row.job_id]["rss"] = row.bytes
        elif row.name == "cuda_max_reserved":
            out[row.job_id]["gpu"] = out[row.job_id].get("gpu", 0) + row.bytes
        elif row.name == "cuda_nvml_process_used":
            nvml[row.job_id] = row.bytes
    for job_id, value in nvml.items():
        out[job_id].setdefault("gpu", value)
    return out


def leaderboard(factory: sessionmaker, resolve: Callable[[str], Path | None]) -> dict[str, Any]:
    """One row per model and dataset, from the newest succeeded job of each: main score,
    peak memory (GPU, or RSS for a job that ran without one), tokens per second (prompt
    and generated tokens over the job's run time), duration, and the job it came from."""
    with factory() as session:
        jobs = session.execute(
            sa.select(Job.id, Job.model, Job.dataset, Job.started_at, Job.finished_at,
                      Job.progress_done)
            .where(Job.state == JobState.SUCCEEDED.value)
            .order_by(Job.id.desc()).limit(MAX_JOBS)).all()
        ids = [j.id for j in jobs]
        if not ids:
            return {"rows": [], "models": []}
        overall = dict(session.execute(sa.select(Score.job_id, Score.value).where(
            Score.job_id.in_(ids), Score.name == "overall")).all())
        tokens = {r.job_id: (r.prompt or 0) + (r.output or 0) for r in session.execute(
            sa.select(Sample.job_id, sa.func.sum(Sample.prompt_tokens).label("prompt"),
                      sa.func.sum(Sample.output_tokens).label("output"))
            .where(Sample.job_id.in_(ids)).group_by(Sample.job_id))}
        peaks = _peaks(session, ids)
    identities: dict[str, tuple[str, str]] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for job in jobs:  # newest first: the first job of a (model, dataset) is the one shown
        key, display = identities.setdefault(job.model, model_identity(job.model, resolve))
        row = rows.get((key, job.dataset))
        if row is not None:
            row["runs"] += 1
            if job.model not in row["names"]:
                row["names"].append(job.model)
            continue
        duration = ((job.finished_at - job.started_at).total_seconds()
                    if job.started_at and job.finished_at else None)
        peak = peaks[job.id]
        rows[(key, job.dataset)] = {
            "model": display, "model_key": key, "names": [job.model], "dataset": job.dataset,
            "job_id": job.id, "score": overall.get(job.id), "samples": job.progress_done,
            "peak_bytes": peak.get("gpu", peak.get("rss")),
            "peak_kind": "gpu" if "gpu" in peak else "rss" if "rss" in peak else None,
            "tokens_per_s": round(tokens.get(job.id, 0) / duration, 1)
            if duration and tokens.get(job.id) else None,
            "duration_s": round(duration, 3) if duration is not None else None,
            "runs": 1}
    models = sorted({(r["model_key"], r["model"]) for r in rows.values()})
    return {"rows": list(rows.values()),
            "models": [{"key": k, "model": m} for k, m in models]}


def memory_by_length(factory: sessionmaker, resolve: Callable[[str], Path | None],
                     datasets: tuple[str, ...] = LENGTH_DATASETS) -> dict[str, Any]:
    """Per dataset, per model (its newest succeeded job): the peak memory of the samples
    at each context length, [[tokens, bytes], ...] sorted by length. The length is the
    NIAH cell's context length, else the prompt's tokens; the memory is each sample's
    GPU peak, or its RSS peak when the job ran without a GPU (`kind`)."""
    out: dict[str, list[dict[str, Any]]] = {}
    with factory() as session:
        for dataset in datasets:
            jobs = session.execute(
                sa.select(Job.id, Job.model).where(Job.state == JobState.SUCCEEDED.value,
                                                   Job.dataset == dataset)
                .order_by(Job.id.desc()).limit(200)).all()
            seen: set[str] = set()
            series = []
            for job in jobs:
                key, display = model_identity(job.model, resolve)
                if key in seen:
                    continue
                seen.add(key)
                samples = session.execute(
                    sa.select(Sample.prompt_tokens, Sample.fields, Sample.peak_gpu_bytes,
                              Sample.peak_rss_bytes).where(Sample.job_id == job.id)).all()
                gpu = any(s.peak_gpu_bytes for s in samples)
                best: dict[int, int] = {}
                for s in samples:
                    value = s.peak_gpu_bytes if gpu else s.peak_rss_bytes
                    if value is None:
                        continue
                    length = int((s.fields or {}).get("context_length") or s.prompt_tokens)
                    best[length] = max(best.get(length, 0), value)
                if best:
                    series.append({"model": display, "job_id": job.id,
                                   "kind": "gpu" if gpu else "rss",
                                   "points": sorted([k, v] for k, v in best.items())})
            out[dataset] = series
    return {"datasets": out}


def rough_duration(factory: sessionmaker, model: str, dataset: str, params: dict[str, Any],
                   items: int | None) -> dict[str, Any]:
    """A rough duration for a job before launch, from finished jobs: seconds per sample
    of this model on this dataset (else of any model on it) times the number of items
    (`items` when the caller knows it, else the item count of the newest job with the
    same parameters). Every figure is None when there is no history to go on."""
    with factory() as session:
        done = session.execute(
            sa.select(Job.model, Job.params, Job.progress_total, Job.progress_done,
                      Job.started_at, Job.finished_at)
            .where(Job.state == JobState.SUCCEEDED.value, Job.dataset == dataset)
            .order_by(Job.id.desc()).limit(200)).all()
    if items is None:
        items = next((j.progress_total for j in done if j.params == params), None)

    def per_sample(rows: list[Any]) -> float | None:
        seconds = sum((j.finished_at - j.started_at).total_seconds() for j in rows
                      if j.started_at and j.finished_at)
        count = sum(j.progress_done or 0 for j in rows)
        return seconds / count if count else None

    same_model = [j for j in done if j.model == model]
    rate, basis = per_sample(same_model), "this model on this dataset"
    if rate is None:
        rate, basis = per_sample(done), "other models on this dataset"
    return {"items": items, "seconds_per_sample": round(rate, 3) if rate else None,
            "seconds": round(rate * items, 1) if rate and items else None,
            "basis": basis if rate else None}


def live_workers(factory: sessionmaker, lease_seconds: float) -> list[dict[str, Any]]:
    """The live workers and the GPU memory each has free for a job (None: a CPU worker,
    bounded by RAM only)."""
    from backend.queue.jobs import list_workers
    from backend.queue.scheduling import is_alive

    now = utcnow()
    return [{"id": w.id, "host": w.host, "state": w.state, "gpu_count": w.gpu_count or 0,
             "gpu_free_bytes": w.gpu_free_bytes if w.gpu_count else None}
            for w in list_workers(factory) if is_alive(w, now, lease_seconds)]
