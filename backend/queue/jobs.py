"""Job lifecycle on the jobs table: submit, claim, lease, record, finish, cancel.

States: queued -> running -> succeeded | failed | cancelled. The row is the
source of truth, and every change that reads before it writes runs in a
`write_session` (the write lock is held from the start), so:

- `claim_job` first re-queues running jobs whose lease expired (or fails them
  after `max_attempts` starts), then takes the next job the worker can run
  (priority, round robin over submitters, age: see scheduling.py) with a
  compare-and-set on its state: two workers never get the same job. On SQLite
  the whole claim holds the database's write lock; on PostgreSQL it locks only
  the rows it reads (`FOR UPDATE SKIP LOCKED`), so workers claim in parallel.
- `record_sample` stores a sample and renews the lease in one transaction, and
  only while the worker still owns the job (`LeaseLost` otherwise), so a worker
  that lost its job cannot write into it; (job_id, idx) is unique, so a
  resumed job never stores a sample twice.
- `finish_job` writes scores, memory peaks and the final state together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from backend.queue.db import (
    IdFloor,
    Job,
    JobState,
    MemoryPeak,
    Sample,
    Score,
    WorkerRow,
    WorkerState,
    WorkerStatus,
    is_postgres,
    utcnow,
    write_session,
)
from backend.queue.notify import announce_work
from backend.queue.scheduling import (
    Capacity,
    less_reserved,
    ordered,
    queued_reasons,
    stale_after,
    worker_state,
)


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
    """A job to queue. `memory_bytes` is its estimated GPU memory (estimated at submit)."""

    model: str
    dataset: str
    params: dict[str, Any]
    timeout_s: float | None = None
    priority: int = 0
    submitter: str = "anonymous"
    worker_label: str | None = None
    num_gpus: int = 1
    memory_bytes: int | None = None
    api: dict[str, Any] | None = None
    api_key_encrypted: str | None = None
    data_parallel: int = 1
    """Shards the job's samples are spread over (one worker each); 1: not sharded."""


def _row(j: NewJob, **extra: Any) -> Job:
    return Job(model=j.model, dataset=j.dataset, params=j.params, timeout_s=j.timeout_s,
               priority=j.priority, submitter=j.submitter, worker_label=j.worker_label,
               num_gpus=j.num_gpus, memory_bytes=j.memory_bytes, api=j.api,
               api_key_encrypted=j.api_key_encrypted,
               state=JobState.QUEUED.value, events=[], scores=[], memory_peaks=[],
               attempts=0, cancel_requested=False, progress_done=0, **extra)


def submit_jobs(factory: sessionmaker, new_jobs: list[NewJob]) -> list[Job]:
    """Queue jobs (all or none), wake idle workers, and return the jobs.

    A job with `data_parallel` N > 1 is queued with N shards: rows of `jobs` with its
    id as `parent_id`, claimed, leased, resumed and cancelled like jobs; shard k
    evaluates the items whose idx % N == k and stores its samples on the job itself."""
    with write_session(factory) as session:
        jobs = [_row(j, shard_count=j.data_parallel if j.data_parallel > 1 else None)
                for j in new_jobs]
        if not is_postgres(session):  # never reuse a deleted job's id (see IdFloor)
            floor = session.get(IdFloor, "jobs")
            newest = session.scalar(sa.select(sa.func.max(Job.id))) or 0
            start = max(newest, floor.value if floor else 0) + 1
            for offset, job in enumerate(jobs):
                job.id = start + offset
        session.add_all(jobs)
        session.flush()
        session.add_all(_row(j, parent_id=job.id, shard_index=k, shard_count=j.data_parallel)
                        for j, job in zip(new_jobs, jobs, strict=True) if j.data_parallel > 1
                        for k in range(j.data_parallel))
        session.flush()
        announce_work(session)
        return jobs


def idle_workers(factory: sessionmaker, lease_seconds: float,
                 worker_label: str | None = None, num_gpus: int = 1) -> int:
    """Workers alive and idle now that could run a job with this label and GPU count,
    counting workers that share a GPU once (LBS_WORKERS above the GPU count: shards on
    one GPU would wait for each other's memory): what `data_parallel: "auto"` spreads
    a job over (at least 1)."""
    now = utcnow()
    count, taken = 0, set()  # (host, NVML index) of the GPUs counted
    with factory() as session:
        for worker in session.scalars(sa.select(WorkerRow).order_by(WorkerRow.id)):
            if worker_state(worker, now, lease_seconds) != WorkerState.IDLE:
                continue
            labels = set(worker.labels or [])
            if worker_label is not None and worker_label not in labels:
                continue
            if num_gpus > max(worker.gpu_count or 0, 1):
                continue
            gpus = {(worker.host, int(g["index"])) for g in worker.gpus or []}
            if gpus & taken:
                continue
            taken |= gpus
            count += 1
    return max(count, 1)


def score_row(job_id: int, entry: Any) -> Score:
    """The stored row of a dataset's ScoreEntry, error bars included."""
    ci95 = getattr(entry, "ci95", None)
    return Score(job_id=job_id, name=entry.name, value=entry.value, count=entry.count,
                 labels=entry.labels, stderr=getattr(entry, "stderr", None),
                 ci_low=ci95[0] if ci95 else None, ci_high=ci95[1] if ci95 else None)


def _close_parent(session: Session, parent_id: int,
                  aggregate: Callable[[list[tuple[dict, float]]], list[Any]] | None = None
                  ) -> None:
    """After a shard ended: when every shard of the job has ended, end the job too -
    failed if a shard failed, cancelled if one was cancelled, else succeeded - with
    scores aggregated over all its samples (as one worker would have) and every
    shard's memory peaks. A failed shard asks the others to stop first."""
    parent = _locked(session, parent_id)
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
    if failed:
        parent.state = JobState.FAILED.value
        parent.error = f"shard {failed[0].shard_index}: {failed[0].error}"
    elif any(s.state == JobState.CANCELLED.value for s in shards):
        parent.state = JobState.CANCELLED.value
    else:
        parent.state = JobState.SUCCEEDED.value
    parent.events = [*parent.events, *({**e, "shard": s.shard_index}
                                       for s in shards for e in s.events or [])]
    parent.finished_at = now
    parent.progress_done = session.scalar(
        sa.select(sa.func.count()).select_from(Sample).where(Sample.job_id == parent_id))


def _requeue_expired(session: Session, now: datetime, max_attempts: int) -> None:
    # SKIP LOCKED: rows another claimer is re-queueing right now are left to it.
    expired = session.scalars(sa.select(Job).where(
        Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)
        .with_for_update(skip_locked=True)).all()
    if any(not job.cancel_requested and job.attempts < max_attempts for job in expired):
        announce_work(session)  # other idle workers may take the rest
    for job in expired:
        note = (f"worker {job.worker_id} stopped renewing its lease "
                f"(attempt {job.attempts} of {max_attempts})")
        _take_back(session, job, now, "lease_expired", note, max_attempts)


def _take_back(session: Session, job: Job, now: datetime, kind: str, note: str,
               max_attempts: int) -> None:
    """A running job its worker no longer runs (lease expired, CUDA context broken): it
    is cancelled if that was asked, failed after `max_attempts` attempts, else queued
    again to resume after its stored samples. A shard that ends this way ends its job
    with it (see _close_parent)."""
    job.events = [*job.events, {"kind": kind, "at": now.isoformat(), "message": note}]
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
    if job.parent_id is not None and JobState(job.state).finished:
        _close_parent(session, job.parent_id)


def _next_queued(session: Session, caps: Capacity, prefer_models: list[str] | None,
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


def next_queued_model(factory: sessionmaker, prefer_models: list[str] | None = None,
                      affinity_seconds: float = 0.0,
                      capacity: Capacity | None = None) -> str | None:
    """Model of the job this worker would claim next (None when the queue is empty)."""
    with factory() as session:
        job = _next_queued(session, capacity or Capacity(), prefer_models, affinity_seconds)
        return job.model if job else None


def claim_job(factory: sessionmaker, worker_id: str, lease_seconds: float,
              max_attempts: int, prefer_models: list[str] | None = None,
              affinity_seconds: float = 0.0, capacity: Capacity | None = None) -> Job | None:
    """Take the next job `worker_id` can run (see `_next_queued` and scheduling.py), or
    None when there is none. `capacity` says what the worker can run (default: a CPU
    worker without labels). The job comes back running, leased for `lease_seconds`."""
    caps = capacity or Capacity()
    with write_session(factory) as session:
        now = utcnow()
        _requeue_expired(session, now, max_attempts)
        if caps.host and caps.gpu_indices:
            caps = less_reserved(caps, _host_workers(session, caps.host, worker_id), now,
                                 lease_seconds)
        job = _next_queued(session, caps, prefer_models, affinity_seconds,
                           lock=is_postgres(session))
        if job is None:
            return None
        job_id = job.id
        claimed = session.execute(
            sa.update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value)
            .values(state=JobState.RUNNING.value, worker_id=worker_id,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    attempts=Job.attempts + 1, claimed_at=now,
                    started_at=sa.func.coalesce(Job.started_at, now), error=None)
        ).rowcount
        if claimed != 1:
            return None
        shard = session.get(Job, job_id)
        if shard.parent_id is not None:  # the job runs from its first shard's claim on
            session.execute(
                sa.update(Job).where(Job.id == shard.parent_id,
                                     Job.state == JobState.QUEUED.value)
                .values(state=JobState.RUNNING.value, started_at=now))
        reserved = None  # the job runs on the worker's first num_gpus GPUs
        if shard.memory_bytes and caps.gpu_indices:
            used = caps.gpu_indices[:max(1, shard.num_gpus)]
            reserved = {str(i): shard.memory_bytes // len(used) for i in used}
        session.execute(sa.update(WorkerRow).where(WorkerRow.id == worker_id)
                        .values(current_job_id=job_id, state=WorkerState.BUSY.value,
                                heartbeat_at=now, gpu_reserved=reserved))
        return session.get(Job, job_id)


def _host_workers(session: Session, host: str, worker_id: str) -> list[WorkerRow]:
    """The other workers of `host`. On PostgreSQL their rows and the claimer's own are
    locked, in id order, until the claim commits: two workers sharing a GPU then claim
    one after the other, each seeing what the other reserved (SQLite's claim already
    holds the database's write lock)."""
    query = sa.select(WorkerRow).where(WorkerRow.host == host).order_by(WorkerRow.id)
    if is_postgres(session):
        query = query.with_for_update()
    return [w for w in session.scalars(query) if w.id != worker_id]


def set_gpu_reservation(factory: sessionmaker, worker_id: str,
                        reserved: dict[str, int] | None) -> None:
    """What the worker's job will still take on each of its GPUs beyond what NVML shows
    (see WorkerRow.gpu_reserved): lowered once its model has loaded, None when it ended."""
    with factory.begin() as session:  # a blind write of the worker's own row
        session.execute(sa.update(WorkerRow).where(WorkerRow.id == worker_id)
                        .values(gpu_reserved=reserved))


def gpu_reservations(factory: sessionmaker, worker_id: str) -> dict[str, int] | None:
    with factory() as session:
        return session.scalar(sa.select(WorkerRow.gpu_reserved)
                              .where(WorkerRow.id == worker_id))


def seconds_to_next_expiry(factory: sessionmaker) -> float | None:
    """Seconds until the earliest lease of a running job expires (None when nothing runs):
    an idle worker looks at the queue again then, to resume the job if its worker died."""
    with factory() as session:
        expiry = session.scalar(sa.select(sa.func.min(Job.lease_expires_at))
                                .where(Job.state == JobState.RUNNING.value))
    return None if expiry is None else max(0.0, (expiry - utcnow()).total_seconds())


def _locked(session: Session, job_id: int) -> Job | None:
    """The job, its row locked until commit on PostgreSQL (SQLite's lock is already held)."""
    return session.get(Job, job_id, with_for_update=True)


def _owned(session: Session, job_id: int, worker_id: str) -> Job:
    job = _locked(session, job_id)
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
    """A job's stored samples; for a shard, those of its job (every shard's)."""
    with factory() as session:
        target = session.scalar(sa.select(sa.func.coalesce(Job.parent_id, Job.id))
                                .where(Job.id == job_id))
        rows = session.execute(sa.select(Sample.idx, Sample.fields, Sample.score)
                               .where(Sample.job_id == target)).all()
    return {idx: (fields, score or 0.0) for idx, fields, score in rows}


def set_total(factory: sessionmaker, job_id: int, worker_id: str, total: int) -> None:
    with write_session(factory) as session:
        job = _owned(session, job_id, worker_id)
        job.progress_total = total
        if job.parent_id is not None:  # every shard knows the whole job's count
            session.execute(sa.update(Job).where(Job.id == job.parent_id)
                            .values(progress_total=total))


def record_manifest(factory: sessionmaker, job_id: int, worker_id: str,
                    manifest: dict[str, Any]) -> None:
    """What the job runs with (backend.engine.manifest), once its model is loaded; a
    resumed job's replaces the earlier one (it may run on another machine)."""
    with write_session(factory) as session:
        _owned(session, job_id, worker_id).manifest = manifest


def record_phase(factory: sessionmaker, job_id: int, worker_id: str,
                 event: dict[str, Any], lease_seconds: float | None = None) -> None:
    """Show a download on the job: a `data_fetch` event (state, repo_id, bytes_done,
    bytes_total) or a `model_download` one (state, model) replaces the job's running one
    of its kind, so polling sees the bytes grow and the state change; the lease is
    renewed too, since a large download may outlast it."""
    with write_session(factory) as session:
        job = _owned(session, job_id, worker_id)
        events = list(job.events or [])
        if events and events[-1].get("kind") == event["kind"] \
                and events[-1].get("state") == "running":
            events[-1] = event
        else:
            events.append(event)
        job.events = events
        if lease_seconds:
            job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)


def storable_text(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL, which a model may well generate; every engine
    # stores U+FFFD instead, so results do not depend on the engine.
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def record_sample(factory: sessionmaker, job_id: int, worker_id: str, lease_seconds: float,
                  values: dict[str, Any]) -> bool:
    """Store one sample and renew the lease; returns whether cancel was requested.
    NUL characters in its text become U+FFFD. A shard stores it on its job, whose
    progress counts every shard's samples."""
    values = {key: storable_text(value) for key, value in values.items()}
    with write_session(factory) as session:
        job = _owned(session, job_id, worker_id)
        session.add(Sample(job_id=job.parent_id or job_id, **values))
        if job.parent_id is not None:
            session.execute(sa.update(Job).where(Job.id == job.parent_id)
                            .values(progress_done=Job.progress_done + 1))
        job.progress_done = (job.progress_done or 0) + 1
        job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
        return job.cancel_requested


def finish_job(factory: sessionmaker, job_id: int, worker_id: str, state: JobState, *,
               scores: list[Any] = (), memory: list[tuple[str, str, int]] = (),
               events: list[dict[str, Any]] = (), error: str | None = None,
               aggregate: Callable[[list[tuple[dict, float]]], list[Any]] | None = None
               ) -> None:
    """Write the outcome of a job in one transaction. Raises LeaseLost.

    A shard keeps its memory peaks and events (not scores: its samples are a part of
    its job's); the last shard to end also ends its job, scored by `aggregate` (the
    dataset's) over all the job's samples."""
    with write_session(factory) as session:
        job = _owned(session, job_id, worker_id)
        session.execute(sa.delete(Score).where(Score.job_id == job_id))
        session.execute(sa.delete(MemoryPeak).where(MemoryPeak.job_id == job_id))
        if job.parent_id is None:
            session.add_all(score_row(job_id, s) for s in scores)
        session.add_all(MemoryPeak(job_id=job_id, name=name, device=device, bytes=value)
                        for name, device, value in memory)
        job.state = state.value
        job.error = storable_text(error)
        job.finished_at = utcnow()
        job.lease_expires_at = None
        job.events = [*job.events, *events]
        if job.parent_id is None:
            job.progress_done = session.scalar(
                sa.select(sa.func.count()).select_from(Sample).where(Sample.job_id == job_id))
        session.execute(sa.update(WorkerRow).where(WorkerRow.id == worker_id)
                        .values(current_job_id=None, state=WorkerState.IDLE.value))
        if job.parent_id is not None:
            session.flush()
            _close_parent(session, job.parent_id, aggregate)


def cancel_job(factory: sessionmaker, job_id: int) -> Job:
    """Cancel a queued job at once, or ask its worker to stop a running one."""
    with write_session(factory) as session:
        # shards before their job, the order a shard's sample or end takes its locks in
        shards = session.scalars(sa.select(Job).where(Job.parent_id == job_id)
                                 .order_by(Job.id).with_for_update()).all()
        job = _locked(session, job_id)
        if job is None:
            raise JobNotFound(job_id)
        if JobState(job.state).finished:
            raise JobConflict(f"job {job_id} is already {job.state}")
        for shard in shards:  # a data-parallel job: every shard stops
            if shard.state == JobState.QUEUED.value:
                shard.state, shard.finished_at = JobState.CANCELLED.value, utcnow()
            elif shard.state == JobState.RUNNING.value:
                shard.cancel_requested = True
        if job.state == JobState.QUEUED.value or (
                shards and all(JobState(s.state).finished for s in shards)):
            job.state = JobState.CANCELLED.value
            job.finished_at = utcnow()
        else:
            job.cancel_requested = True
        if job.parent_id is not None and JobState(job.state).finished:
            session.flush()
            _close_parent(session, job.parent_id)
        return job


def delete_job(factory: sessionmaker, job_id: int) -> None:
    """Delete a job that is not running, with its samples, scores and peaks."""
    with write_session(factory) as session:
        job = _locked(session, job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.state == JobState.RUNNING.value:
            raise JobConflict(f"job {job_id} is running; cancel it first")
        for shard in session.scalars(sa.select(Job).where(Job.parent_id == job_id)):
            session.delete(shard)
        session.delete(job)
        if not is_postgres(session):
            floor = session.get(IdFloor, "jobs") or IdFloor(name="jobs", value=0)
            floor.value = max(floor.value, job_id)
            session.add(floor)


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


def get_job(factory: sessionmaker, job_id: int) -> JobView:
    with factory() as session:
        found = _read_jobs(session, sa.select(*_JOB_COLUMNS).where(Job.id == job_id))
    if not found:
        raise JobNotFound(job_id)
    return found[0]


def list_shards(factory: sessionmaker, job_id: int) -> list[JobView]:
    """The shards of a data-parallel job, by shard index (none for another job)."""
    with factory() as session:
        return _read_jobs(session, sa.select(*_JOB_COLUMNS).where(Job.parent_id == job_id)
                          .order_by(Job.shard_index))


def list_jobs(factory: sessionmaker, *, state: str | None = None, model: str | None = None,
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
    with factory() as session:
        total = session.scalar(query.with_only_columns(sa.func.count(), maintain_column_froms=True))
        jobs = _read_jobs(session, query.order_by(Job.id.desc()).offset(offset).limit(limit))
    return jobs, total or 0


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
                    device: str, *, labels: tuple[str, ...] | list[str] = (),
                    gpus: list[dict[str, Any]] | None = None,
                    gpu_free_bytes: int | None = None,
                    current_job_id: int | None = None) -> None:
    """Insert or refresh the worker's row: where it runs, its labels and its GPUs
    (`gpus`: index, name, total_bytes, free_bytes per GPU; empty for a CPU worker),
    idle, or busy with `current_job_id` (a worker whose row was pruned while it slept)."""
    with write_session(factory) as session:
        worker = session.get(WorkerRow, worker_id, with_for_update=True) or WorkerRow(id=worker_id)
        worker.host, worker.pid, worker.device = host, pid, device
        worker.state = (WorkerState.IDLE if current_job_id is None else WorkerState.BUSY).value
        worker.current_job_id = current_job_id
        worker.labels, worker.gpus = list(labels), list(gpus or [])
        worker.gpu_count, worker.gpu_free_bytes = len(worker.gpus), gpu_free_bytes
        worker.started_at = worker.heartbeat_at = utcnow()
        session.add(worker)


def worker_heartbeat(factory: sessionmaker, worker_id: str, state: str | None = None,
                     *, gpus: list[dict[str, Any]] | None = None,
                     gpu_free_bytes: int | None = None) -> bool:
    """Refresh the worker's heartbeat (and its state and GPU readings when given).
    A worker marked lost that beats again is back: idle, or busy with its job.
    Returns False when the worker has no row (pruned: see prune_workers), so that it
    registers again."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if state:
        values["state"] = state
    else:
        values["state"] = sa.case(
            (WorkerRow.state != WorkerState.LOST.value, WorkerRow.state),
            (WorkerRow.current_job_id.is_(None), WorkerState.IDLE.value),
            else_=WorkerState.BUSY.value)
    if gpus is not None:
        values["gpus"] = gpus
        values["gpu_free_bytes"] = gpu_free_bytes
    with factory.begin() as session:  # a blind write: no need to hold SQLite's lock first
        return session.execute(sa.update(WorkerRow).where(WorkerRow.id == worker_id)
                               .values(**values)).rowcount > 0


def mark_lost_workers(factory: sessionmaker, lease_seconds: float) -> list[str]:
    """Mark workers whose heartbeats stopped as lost; returns their ids. Their jobs go
    back to the queue when their leases expire (in the next claim)."""
    cutoff = utcnow() - stale_after(lease_seconds)
    with write_session(factory) as session:
        lost = session.scalars(sa.select(WorkerRow).where(
            WorkerRow.state.in_([WorkerState.IDLE.value, WorkerState.BUSY.value]),
            WorkerRow.heartbeat_at < cutoff).with_for_update(skip_locked=True)).all()
        for worker in lost:
            worker.state = WorkerState.LOST.value
        return [w.id for w in lost]


DEAD_WORKER_RETENTION = timedelta(days=7)
"""How long the row and the published status of a worker whose heartbeats stopped are
kept (it shows as lost or stopped in /api/workers meanwhile); control commands answered
or expired that long ago go too (control.prune_commands)."""


def prune_workers(factory: sessionmaker,
                  retention: timedelta = DEAD_WORKER_RETENTION) -> list[str]:
    """Delete the workers whose last heartbeat is older than `retention`, with their
    status rows (and status rows of no worker as old); returns the ids deleted. A
    worker that was only asleep registers again on its next heartbeat."""
    cutoff = utcnow() - retention
    with write_session(factory) as session:
        gone = list(session.scalars(sa.select(WorkerRow.id).where(
            WorkerRow.heartbeat_at < cutoff)))
        session.execute(sa.delete(WorkerStatus).where(
            WorkerStatus.worker_id.in_(gone)
            | ((WorkerStatus.updated_at < cutoff)
               & WorkerStatus.worker_id.not_in(sa.select(WorkerRow.id)))))
        session.execute(sa.delete(WorkerRow).where(WorkerRow.id.in_(gone)))
        return gone


def list_workers(factory: sessionmaker) -> list[WorkerRow]:
    with factory() as session:
        return list(session.scalars(sa.select(WorkerRow).order_by(WorkerRow.started_at)).all())


def waiting_reasons(factory: sessionmaker, jobs: list[Any],
                    lease_seconds: float) -> dict[int, str]:
    """Why each queued job in `jobs` waits (see scheduling.waiting_reason)."""
    with factory() as session:  # connects only if a job is queued (queued_reasons)
        return queued_reasons(session, jobs, utcnow(), lease_seconds)


def give_back_job(factory: sessionmaker, job_id: int, worker_id: str, error: str,
                  max_attempts: int) -> JobState:
    """A worker whose CUDA context broke gives its running job back: queued again (it
    resumes after its stored samples on a fresh worker), or failed with `error` when
    it has had `max_attempts` attempts. The attempt counts, so a job that breaks every
    worker fails instead of restarting them for ever. Returns the new state."""
    with write_session(factory) as session:
        job = _owned(session, job_id, worker_id)
        _take_back(session, job, utcnow(), "cuda_error",
                   f"worker {worker_id}: {error} (attempt {job.attempts} of {max_attempts})",
                   max_attempts)
        if job.state == JobState.QUEUED.value:
            announce_work(session)
        session.execute(sa.update(WorkerRow).where(WorkerRow.id == worker_id)
                        .values(current_job_id=None, state=WorkerState.IDLE.value))
        return JobState(job.state)


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
        session.execute(sa.update(WorkerRow).where(WorkerRow.id == worker_id)
                        .values(current_job_id=None, state=WorkerState.IDLE.value))
        announce_work(session)
