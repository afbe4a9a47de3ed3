"""The read side of the queue: jobs, shards and samples as the API shows them, why a
queued job waits, what a worker would claim next, and a rough duration for a job before
it is launched. Plain reads, no lock taken; `jobs.Queue` adds the writes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from backend.queue.db import Job, JobState, MemoryPeak, Sample, Score, utcnow
from backend.queue.scheduling import Capacity, ordered, queued_reasons


class JobNotFound(LookupError):
    def __init__(self, job_id: int):
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class JobView(SimpleNamespace):
    """A job as read for showing: every column of `jobs` as an attribute, plus `scores`
    and `memory_peaks` (rows with name/value/count/labels and name/device/bytes).
    Read with plain SQL rows rather than ORM objects, which costs a third of the time:
    the API reads jobs on every poll of every client."""


def _read_jobs(session: Session, query: sa.Select) -> list[JobView]:
    rows = session.execute(query).mappings().all()
    ids = [row["id"] for row in rows]
    scores: dict[int, list[Any]] = {i: [] for i in ids}
    peaks: dict[int, list[Any]] = {i: [] for i in ids}
    if ids:
        for score in session.execute(
                sa.select(Score.job_id, Score.name, Score.value, Score.count, Score.labels,
                          Score.stderr, Score.ci_low, Score.ci_high)
                .where(Score.job_id.in_(ids)).order_by(Score.id)):
            scores[score.job_id].append(score)
        for peak in session.execute(
                sa.select(MemoryPeak.job_id, MemoryPeak.name, MemoryPeak.device,
                          MemoryPeak.bytes)
                .where(MemoryPeak.job_id.in_(ids)).order_by(MemoryPeak.id)):
            peaks[peak.job_id].append(peak)
    return [JobView(**row, scores=scores[row["id"]], memory_peaks=peaks[row["id"]])
            for row in rows]


_JOB_COLUMNS = tuple(Job.__table__.c)


def next_queued(session: Session, caps: Capacity, prefer_models: list[str] | None,
                affinity_seconds: float, lock: bool = False) -> Any | None:
    """The job a worker should take next (id, model, priority, created_at): the first in
    `scheduling.ordered`, unless a job of the same priority for a model the worker holds
    is at most `affinity_seconds` younger than it. `lock`: lock the rows read, skipping
    rows other claimers hold (PostgreSQL), so each claimer gets a different job."""
    def first(query: sa.Select) -> Any | None:
        if lock:
            query = query.with_for_update(of=Job, skip_locked=True)
        return session.execute(query.limit(1)).first()

    queued = ordered(caps)
    best = first(queued)
    if best is None or not prefer_models or best.model in prefer_models:
        return best
    preferred = first(queued.where(Job.model.in_(prefer_models), Job.priority == best.priority))
    if preferred is not None and \
            (preferred.created_at - best.created_at).total_seconds() <= affinity_seconds:
        return preferred
    return best


class QueueReads:
    """Reads of the queue through `factory` (see `jobs.Queue` for the contract)."""

    factory: sessionmaker
    lease_seconds: float
    affinity_seconds: float

    def get(self, job_id: int) -> JobView:
        """The job; raises JobNotFound."""
        with self.factory() as session:
            found = _read_jobs(session, sa.select(*_JOB_COLUMNS).where(Job.id == job_id))
        if not found:
            raise JobNotFound(job_id)
        return found[0]

    def shards(self, job_id: int) -> list[JobView]:
        """The shards of a data-parallel job, by shard index (none for another job)."""
        with self.factory() as session:
            return _read_jobs(session, sa.select(*_JOB_COLUMNS)
                              .where(Job.parent_id == job_id).order_by(Job.shard_index))

    def list(self, *, state: str | None = None, model: str | None = None,
             dataset: str | None = None, submitter: str | None = None, offset: int = 0,
             limit: int = 50) -> tuple[list[JobView], int]:
        """A page of jobs, newest first, and the number of jobs matching the filters."""
        query = sa.select(*_JOB_COLUMNS).where(Job.parent_id.is_(None))  # shards: in their job
        if submitter:
            query = query.where(Job.submitter == submitter)
        if state:
            query = query.where(Job.state == state)
        if model:
            query = query.where(Job.model == model)
        if dataset:
            query = query.where(Job.dataset == dataset)
        with self.factory() as session:
            total = session.scalar(query.with_only_columns(sa.func.count(),
                                                           maintain_column_froms=True))
            jobs = _read_jobs(session, query.order_by(Job.id.desc()).offset(offset).limit(limit))
        return jobs, total or 0

    def samples(self, job_id: int, *, offset: int = 0,
                limit: int = 1000) -> tuple[list[Sample], int]:
        """A page of the job's samples by index, and their number; raises JobNotFound."""
        with self.factory() as session:
            if session.get(Job, job_id) is None:
                raise JobNotFound(job_id)
            total = session.scalar(sa.select(sa.func.count()).select_from(Sample)
                                   .where(Sample.job_id == job_id))
            rows = session.scalars(sa.select(Sample).where(Sample.job_id == job_id)
                                   .order_by(Sample.idx).offset(offset).limit(limit)).all()
        return list(rows), total or 0

    def stored_samples(self, job_id: int) -> dict[int, tuple[dict, float]]:
        """A job's stored samples; for a shard, those of its job (every shard's)."""
        with self.factory() as session:
            target = session.scalar(sa.select(sa.func.coalesce(Job.parent_id, Job.id))
                                    .where(Job.id == job_id))
            rows = session.execute(sa.select(Sample.idx, Sample.fields, Sample.score)
                                   .where(Sample.job_id == target)).all()
        return {idx: (fields, score or 0.0) for idx, fields, score in rows}

    def waiting_reasons(self, jobs: list[Any]) -> dict[int, str]:
        """Why each queued job in `jobs` waits (see scheduling.waiting_reason)."""
        with self.factory() as session:  # connects only if a job is queued (queued_reasons)
            return queued_reasons(session, jobs, utcnow(), self.lease_seconds)

    def next_model(self, prefer_models: list[str] | None = None,
                   capacity: Capacity | None = None) -> str | None:
        """Model of the job this worker would claim next (None when the queue is empty)."""
        with self.factory() as session:
            job = next_queued(session, capacity or Capacity(), prefer_models,
                              self.affinity_seconds)
            return job.model if job else None

    def seconds_to_next_expiry(self) -> float | None:
        """Seconds until the earliest lease of a running job expires (None when nothing
        runs): an idle worker looks at the queue again then, to resume the job if its
        worker died."""
        with self.factory() as session:
            expiry = session.scalar(sa.select(sa.func.min(Job.lease_expires_at))
                                    .where(Job.state == JobState.RUNNING.value))
        return None if expiry is None else max(0.0, (expiry - utcnow()).total_seconds())

    def rough_duration(self, model: str, dataset: str, params: dict[str, Any],
                       items: int | None) -> dict[str, Any]:
        """A rough duration for a job before launch, from finished jobs: seconds per sample
        of this model on this dataset (else of any model on it) times the number of items
        (`items` when the caller knows it, else the item count of the newest job with the
        same parameters). Every figure is None when there is no history to go on."""
        with self.factory() as session:
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
