"""Job lifecycle on the jobs table: submit, claim, lease, record, finish, cancel.

States: queued -> running -> succeeded | failed | cancelled. The row is the
source of truth, and every change that reads before it writes runs in a
`write_session` (the write lock is held from the start), so:

- `claim_job` first re-queues running jobs whose lease expired (or fails them
  after `max_attempts` starts), then takes the oldest queued job with a
  compare-and-set on its state: two workers never get the same job.
- `record_sample` stores a sample and renews the lease in one transaction, and
  only while the worker still owns the job (`LeaseLost` otherwise), so a worker
  that lost its job cannot write into it; (job_id, idx) is unique, so a
  resumed job never stores a sample twice.
- `finish_job` writes scores, memory peaks and the final state together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload, sessionmaker

from backend.db import Job, JobState, MemoryPeak, Sample, Score, Worker, utcnow, write_session


class JobNotFound(LookupError):
    def __init__(self, job_id: int):
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class JobConflict(RuntimeError):
    """The job is in a state that does not allow the action."""


class LeaseLost(RuntimeError):
    """The worker no longer owns the job (its lease expired and it was re-queued)."""


@dataclass
class NewJob:
    model: str
    dataset: str
    params: dict[str, Any]
    timeout_s: float | None = None


def submit_jobs(factory: sessionmaker, new_jobs: list[NewJob]) -> list[Job]:
    """Queue jobs (all or none) and return them."""
    with write_session(factory) as session:
        jobs = [Job(model=j.model, dataset=j.dataset, params=j.params, timeout_s=j.timeout_s,
                    state=JobState.QUEUED.value, events=[], scores=[], memory_peaks=[],
                    attempts=0, cancel_requested=False, progress_done=0)
                for j in new_jobs]
        session.add_all(jobs)
        session.flush()
        return jobs


def _requeue_expired(session: Session, now: datetime, max_attempts: int) -> None:
    expired = session.scalars(sa.select(Job).where(
        Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)).all()
    for job in expired:
        note = (f"worker {job.worker_id} stopped renewing its lease "
                f"(attempt {job.attempts} of {max_attempts})")
        job.events = [*job.events, {"kind": "lease_expired", "at": now.isoformat(),
                                    "message": note}]
        job.worker_id = None
        job.lease_expires_at = None
        if job.cancel_requested:
            job.state = JobState.CANCELLED.value
            job.finished_at = now
        elif job.attempts >= max_attempts:
            job.state = JobState.FAILED.value
            job.finished_at = now
            job.error = f"gave up after {job.attempts} attempts: {note}"
        else:
            job.state = JobState.QUEUED.value


def _next_queued(session: Session, prefer_models: list[str] | None,
                 affinity_seconds: float) -> Job | None:
    """The job a worker should take next: the oldest queued one, unless a queued job
    for a model the worker holds is at most `affinity_seconds` younger than it."""
    queued = sa.select(Job).where(Job.state == JobState.QUEUED.value).order_by(Job.id)
    oldest = session.scalar(queued.limit(1))
    if oldest is None or not prefer_models or oldest.model in prefer_models:
        return oldest
    preferred = session.scalar(queued.where(Job.model.in_(prefer_models)).limit(1))
    if preferred is not None and \
            (preferred.created_at - oldest.created_at).total_seconds() <= affinity_seconds:
        return preferred
    return oldest


def next_queued_model(factory: sessionmaker, prefer_models: list[str] | None = None,
                      affinity_seconds: float = 0.0) -> str | None:
    """Model of the job this worker would claim next (None when the queue is empty)."""
    with factory() as session:
        job = _next_queued(session, prefer_models, affinity_seconds)
        return job.model if job else None


def claim_job(factory: sessionmaker, worker_id: str, lease_seconds: float,
              max_attempts: int, prefer_models: list[str] | None = None,
              affinity_seconds: float = 0.0) -> Job | None:
    """Take the next job for `worker_id` (see `_next_queued`), or None when there is none."""
    with write_session(factory) as session:
        now = utcnow()
        _requeue_expired(session, now, max_attempts)
        job = _next_queued(session, prefer_models, affinity_seconds)
        if job is None:
            return None
        job_id = job.id
        claimed = session.execute(
            sa.update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value)
            .values(state=JobState.RUNNING.value, worker_id=worker_id,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    attempts=Job.attempts + 1,
                    started_at=sa.func.coalesce(Job.started_at, now), error=None)
        ).rowcount
        if claimed != 1:
            return None
        session.execute(sa.update(Worker).where(Worker.id == worker_id)
                        .values(current_job_id=job_id, state="busy", heartbeat_at=now))
        return session.get(Job, job_id)


def _owned(session: Session, job_id: int, worker_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.state != JobState.RUNNING.value or job.worker_id != worker_id:
        raise LeaseLost(f"job {job_id} is no longer held by worker {worker_id}")
    return job


def renew_lease(factory: sessionmaker, job_id: int, worker_id: str,
                lease_seconds: float) -> bool:
    """Extend the lease; returns whether cancel was requested. Raises LeaseLost."""
    with write_session(factory) as session:
        job = _owned(session, job_id, worker_id)
        job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
        return job.cancel_requested


def stored_samples(factory: sessionmaker, job_id: int) -> dict[int, tuple[dict, float]]:
    with factory() as session:
        rows = session.execute(sa.select(Sample.idx, Sample.fields, Sample.score)
                               .where(Sample.job_id == job_id)).all()
    return {idx: (fields, score or 0.0) for idx, fields, score in rows}


def set_total(factory: sessionmaker, job_id: int, worker_id: str, total: int) -> None:
    with write_session(factory) as session:
        _owned(session, job_id, worker_id).progress_total = total


def record_sample(factory: sessionmaker, job_id: int, worker_id: str, lease_seconds: float,
                  values: dict[str, Any]) -> bool:
    """Store one sample and renew the lease; returns whether cancel was requested."""
    with write_session(factory) as session:
        job = _owned(session, job_id, worker_id)
        session.add(Sample(job_id=job_id, **values))
        job.progress_done = (job.progress_done or 0) + 1
        job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
        return job.cancel_requested


def finish_job(factory: sessionmaker, job_id: int, worker_id: str, state: JobState, *,
               scores: list[Any] = (), memory: list[tuple[str, str, int]] = (),
               events: list[dict[str, Any]] = (), error: str | None = None) -> None:
    """Write the outcome of a job in one transaction. Raises LeaseLost."""
    with write_session(factory) as session:
        job = _owned(session, job_id, worker_id)
        session.execute(sa.delete(Score).where(Score.job_id == job_id))
        session.execute(sa.delete(MemoryPeak).where(MemoryPeak.job_id == job_id))
        session.add_all(Score(job_id=job_id, name=s.name, value=s.value, count=s.count,
                              labels=s.labels) for s in scores)
        session.add_all(MemoryPeak(job_id=job_id, name=name, device=device, bytes=value)
                        for name, device, value in memory)
        job.state = state.value
        job.error = error
        job.finished_at = utcnow()
        job.lease_expires_at = None
        job.events = [*job.events, *events]
        job.progress_done = session.scalar(
            sa.select(sa.func.count()).select_from(Sample).where(Sample.job_id == job_id))
        session.execute(sa.update(Worker).where(Worker.id == worker_id)
                        .values(current_job_id=None, state="idle"))


def cancel_job(factory: sessionmaker, job_id: int) -> Job:
    """Cancel a queued job at once, or ask its worker to stop a running one."""
    with write_session(factory) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        if JobState(job.state).finished:
            raise JobConflict(f"job {job_id} is already {job.state}")
        if job.state == JobState.QUEUED.value:
            job.state = JobState.CANCELLED.value
            job.finished_at = utcnow()
        else:
            job.cancel_requested = True
        return job


def delete_job(factory: sessionmaker, job_id: int) -> None:
    """Delete a job that is not running, with its samples, scores and peaks."""
    with write_session(factory) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.state == JobState.RUNNING.value:
            raise JobConflict(f"job {job_id} is running; cancel it first")
        session.delete(job)


def get_job(factory: sessionmaker, job_id: int) -> Job:
    with factory() as session:
        job = session.scalar(sa.select(Job).where(Job.id == job_id).options(
            selectinload(Job.scores), selectinload(Job.memory_peaks)))
        if job is None:
            raise JobNotFound(job_id)
        return job


def list_jobs(factory: sessionmaker, *, state: str | None = None, model: str | None = None,
              dataset: str | None = None, offset: int = 0,
              limit: int = 50) -> tuple[list[Job], int]:
    """A page of jobs, newest first, and the number of jobs matching the filters."""
    query = sa.select(Job)
    if state:
        query = query.where(Job.state == state)
    if model:
        query = query.where(Job.model == model)
    if dataset:
        query = query.where(Job.dataset == dataset)
    with factory() as session:
        total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery()))
        jobs = session.scalars(query.order_by(Job.id.desc()).offset(offset).limit(limit)
                               .options(selectinload(Job.scores),
                                        selectinload(Job.memory_peaks))).all()
    return list(jobs), total or 0


def list_samples(factory: sessionmaker, job_id: int, *, offset: int = 0,
                 limit: int = 1000) -> tuple[list[Sample], int]:
    with factory() as session:
        if session.get(Job, job_id) is None:
            raise JobNotFound(job_id)
        total = session.scalar(sa.select(sa.func.count()).select_from(Sample)
                               .where(Sample.job_id == job_id))
        rows = session.scalars(sa.select(Sample).where(Sample.job_id == job_id)
                               .order_by(Sample.idx).offset(offset).limit(limit)).all()
    return list(rows), total or 0


# --- workers ----------------------------------------------------------------------

def register_worker(factory: sessionmaker, worker_id: str, host: str, pid: int,
                    device: str) -> None:
    with write_session(factory) as session:
        worker = session.get(Worker, worker_id) or Worker(id=worker_id)
        worker.host, worker.pid, worker.device = host, pid, device
        worker.state, worker.current_job_id = "idle", None
        worker.started_at = worker.heartbeat_at = utcnow()
        session.add(worker)


def worker_heartbeat(factory: sessionmaker, worker_id: str, state: str | None = None) -> None:
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if state:
        values["state"] = state
    with write_session(factory) as session:
        session.execute(sa.update(Worker).where(Worker.id == worker_id).values(**values))


def list_workers(factory: sessionmaker) -> list[Worker]:
    with factory() as session:
        return list(session.scalars(sa.select(Worker).order_by(Worker.started_at)).all())


def requeue_job(factory: sessionmaker, job_id: int, worker_id: str) -> None:
    """Give a running job back to the queue (worker shutting down); it resumes later
    after its stored samples, and this start does not count as an attempt."""
    with write_session(factory) as session:
        job = _owned(session, job_id, worker_id)
        job.state = JobState.QUEUED.value
        job.worker_id = None
        job.lease_expires_at = None
        job.attempts = max(0, job.attempts - 1)
        job.events = [*job.events, {"kind": "requeued", "at": utcnow().isoformat(),
                                    "message": f"worker {worker_id} shut down"}]
        session.execute(sa.update(Worker).where(Worker.id == worker_id)
                        .values(current_job_id=None, state="idle"))
