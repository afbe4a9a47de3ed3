"""How a data-parallel job ends: when its last shard has ended, the job ends too, with
scores aggregated over every shard's samples and every shard's memory peaks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.queue.db import Job, JobState, MemoryPeak, Sample, Score, utcnow


def locked(session: Session, job_id: int) -> Job | None:
    """The job, its row locked until commit on PostgreSQL (SQLite's lock is already held)."""
    return session.get(Job, job_id, with_for_update=True)


def score_row(job_id: int, entry: Any) -> Score:
    """The stored row of a dataset's ScoreEntry, error bars included."""
    ci95 = getattr(entry, "ci95", None)
    return Score(job_id=job_id, name=entry.name, value=entry.value, count=entry.count,
                 labels=entry.labels, stderr=getattr(entry, "stderr", None),
                 ci_low=ci95[0] if ci95 else None, ci_high=ci95[1] if ci95 else None)


def _missing(parent: Job, shards: int, stored: int) -> str | None:
    """Why a job whose shards all ended is not whole (a shard's row was lost, and its
    samples with it), or None when every sample and shard is there."""
    total = parent.progress_total
    if (total is None or stored >= total) and shards >= (parent.shard_count or 0):
        return None
    counted = f"{total - stored} of {total} samples missing" if total is not None \
        and stored < total else "samples missing"
    return (f"{counted}: {shards} of {parent.shard_count} shards ran, so scores would "
            "cover only a part of the job")


def close_parent(session: Session, parent_id: int,
                 aggregate: Callable[[list[tuple[dict, float]]], list[Any]] | None = None
                 ) -> None:
    """After a shard ended: when every shard of the job has ended, end the job too -
    failed if a shard failed, cancelled if one was cancelled, failed if fewer samples
    are stored than the job has (or shards are missing), else succeeded - with
    scores aggregated over all its samples (as one worker would have) and every
    shard's memory peaks. A failed shard asks the others to stop first."""
    parent = locked(session, parent_id)
    if parent is None or JobState(parent.state).finished:
        return
    shards = session.scalars(sa.select(Job).where(Job.parent_id == parent_id)
                             .order_by(Job.shard_index)).all()
    now = utcnow()
    failed = [s for s in shards if s.state == JobState.FAILED.value]
    if failed:
        for shard in shards:
            if shard.state == JobState.QUEUED.value:
                shard.state, shard.finished_at = JobState.CANCELLED.value, now
            elif shard.state == JobState.RUNNING.value:
                shard.cancel_requested = True
    if any(not JobState(s.state).finished for s in shards):
        return
    session.execute(sa.delete(Score).where(Score.job_id == parent_id))
    session.execute(sa.delete(MemoryPeak).where(MemoryPeak.job_id == parent_id))
    if aggregate is not None:
        rows = session.execute(sa.select(Sample.fields, Sample.score)
                               .where(Sample.job_id == parent_id)
                               .order_by(Sample.idx)).all()
        session.add_all(score_row(parent_id, e)
                        for e in aggregate([(f, sc or 0.0) for f, sc in rows]))
    highest: dict[tuple[str, str], int] = {}
    for peak in session.scalars(sa.select(MemoryPeak).where(
            MemoryPeak.job_id.in_([s.id for s in shards])).order_by(MemoryPeak.id)):
        shard = next(s for s in shards if s.id == peak.job_id)
        session.add(MemoryPeak(job_id=parent_id, name=f"shard{shard.shard_index}_{peak.name}",
                               device=peak.device, bytes=peak.bytes))
        key = (peak.name, peak.device)
        highest[key] = max(highest.get(key, 0), peak.bytes)
    session.add_all(MemoryPeak(job_id=parent_id, name=name, device=device, bytes=value)
                    for (name, device), value in highest.items())
    stored = session.scalar(
        sa.select(sa.func.count()).select_from(Sample).where(Sample.job_id == parent_id))
    if failed:
        parent.state = JobState.FAILED.value
        parent.error = f"shard {failed[0].shard_index}: {failed[0].error}"
    elif any(s.state == JobState.CANCELLED.value for s in shards):
        parent.state = JobState.CANCELLED.value
    elif (missing := _missing(parent, len(shards), stored)) is not None:
        parent.state = JobState.FAILED.value  # never a success over a part of the job
        parent.error = missing
    else:
        parent.state = JobState.SUCCEEDED.value
    parent.events = [*parent.events, *({**e, "shard": s.shard_index}
                                       for s in shards for e in s.events or [])]
    parent.finished_at = now
    parent.progress_done = stored
