"""The queue: jobs on the jobs table, from submit to finish, and the worker registry
and command channel beside them (`Queue`).

States: queued -> running -> succeeded | failed | cancelled. The row is the source of
truth, and every change that reads before it writes runs in a `write_session` (the
write lock is held from the start).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from backend.common.config import Settings
from backend.queue.control import Commands
from backend.queue.db import (
    IdFloor,
    Job,
    JobState,
    MemoryPeak,
    Sample,
    Score,
    WorkerRow,
    WorkerState,
    is_postgres,
    session_factory,
    utcnow,
    write_session,
)
from backend.queue.notify import announce_work
from backend.queue.reads import JobNotFound, QueueReads, next_queued
from backend.queue.scheduling import Capacity, less_reserved
from backend.queue.shards import close_parent, locked, score_row
from backend.queue.workers import Workers


class JobConflict(RuntimeError):
    """The job is in a state that does not allow the action."""


class TooManyQueued(RuntimeError):
    """A submission would leave a submitter more queued jobs than the queue allows."""

    def __init__(self, submitter: str, queued: int, adding: int, cap: int):
        super().__init__(
            f"submitter {submitter!r} has {queued} jobs queued and this submission adds "
            f"{adding} (a data-parallel job's shards counted); at most {cap} may wait at "
            "once (LBS_MAX_QUEUED_PER_SUBMITTER): wait for some to run, or cancel some")
        self.submitter = submitter


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


def storable_text(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL, which a model may well generate; every engine
    # stores U+FFFD instead, so results do not depend on the engine.
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


MAX_STORED_PREDICTION = 64 * 1024
"""Characters of a sample's prediction that are stored (scores are computed on the
whole answer first); a remote server may answer megabytes."""


def capped_prediction(values: dict[str, Any]) -> dict[str, Any]:
    """A sample's values with a prediction longer than MAX_STORED_PREDICTION cut to it,
    ending in a visible mark, and `prediction_cut` {"stored_chars", "total_chars"} in
    its fields (a comparison of methods keeps a copy of the prediction there: cut too)."""
    text = values.get("prediction")
    if not isinstance(text, str) or len(text) <= MAX_STORED_PREDICTION:
        return values
    mark = (f"\n[cut: the answer has {len(text)} characters; the first "
            f"{MAX_STORED_PREDICTION} are stored]")
    fields = dict(values.get("fields") or {})
    if isinstance(fields.get("prediction"), str):
        fields["prediction"] = fields["prediction"][:MAX_STORED_PREDICTION] + mark
    fields["prediction_cut"] = {"stored_chars": MAX_STORED_PREDICTION,
                                "total_chars": len(text)}
    return {**values, "prediction": text[:MAX_STORED_PREDICTION] + mark, "fields": fields}


def _owned(session: Session, job_id: int, worker_id: str) -> Job:
    job = locked(session, job_id)
    if job is None or job.state != JobState.RUNNING.value or job.worker_id != worker_id:
        raise LeaseLost(f"job {job_id} is no longer held by worker {worker_id}")
    return job


def _take_back(session: Session, job: Job, now: datetime, kind: str, note: str,
               max_attempts: int) -> None:
    """A running job its worker no longer runs (lease expired, CUDA context broken): it
    is cancelled if that was asked, failed after `max_attempts` attempts, else queued
    again to resume after its stored samples. A shard that ends this way ends its job
    with it (see shards.close_parent)."""
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
        close_parent(session, job.parent_id)


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


def _host_workers(session: Session, host: str, worker_id: str) -> list[WorkerRow]:
    """The other workers of `host`. On PostgreSQL their rows and the claimer's own are
    locked, in id order, until the claim commits: two workers sharing a GPU then claim
    one after the other, each seeing what the other reserved (SQLite's claim already
    holds the database's write lock)."""
    query = sa.select(WorkerRow).where(WorkerRow.host == host).order_by(WorkerRow.id)
    if is_postgres(session):
        query = query.with_for_update()
    return [w for w in session.scalars(query) if w.id != worker_id]


def _worker_idle(session: Session, worker_id: str) -> None:
    session.execute(sa.update(WorkerRow).where(WorkerRow.id == worker_id)
                    .values(current_job_id=None, state=WorkerState.IDLE.value))


class Queue(QueueReads):
    """The job queue on one database (`factory`), with its lease settings.

    A job is leased for `lease_seconds` to the worker that claimed it; the worker keeps
    the lease by `renew`ing it (and by every `record_sample`). A job whose lease expired
    goes back to the queue at the next `claim` and resumes after its stored samples, up
    to `max_attempts` starts, then fails. `affinity_seconds`: a worker takes a job for a
    model it holds before an older one of the same priority at most this much older.
    `workers` is the worker registry, `commands` the channel to the workers' model
    managers; `factory` is there for reads the queue does not offer.

    Guarantees, on SQLite and on PostgreSQL alike:

    - Every method is one transaction (`commands.send` aside: see control.py), and every
      write that reads first holds SQLite's write lock from its start or locks the rows
      it reads on PostgreSQL (`FOR UPDATE`, `SKIP LOCKED` for claims).
    - `submit` queues all the jobs or none and wakes idle workers.
    - `claim` never gives one job to two workers: it re-queues expired jobs, takes the
      next job the worker can run (priority, round robin over submitters, age, affinity:
      scheduling.py) with a compare-and-set on its state, and marks the worker busy.
      On PostgreSQL claimers lock only the rows they read, so they claim in parallel.
    - `renew`, `record_*`, `set_total`, `finish`, `give_back` and `requeue` act only
      while the worker still owns the job, and raise LeaseLost otherwise, so a worker
      that lost its job cannot write into it. `record_sample` stores a sample and
      renews the lease together; (job_id, idx) is unique, so a resumed job never
      stores a sample twice. `finish` writes scores, memory peaks and the state
      together.
    - `cancel` and `delete` raise JobNotFound for an unknown job and JobConflict when
      its state forbids it (cancel: already finished; delete: running, or a shard:
      a data-parallel job is deleted whole).
    - A data-parallel job is queued as shards (rows with the job as `parent_id`),
      claimed, leased and cancelled like jobs; the last shard to end ends the job.
    - Reads (`get`, `shards`, `list`, `samples`, `stored_samples`, `waiting_reasons`,
      `next_model`, `rough_duration`: reads.py) take no lock; `get` and `samples` raise
      JobNotFound.
    """

    def __init__(self, factory: sessionmaker, *, lease_seconds: float, max_attempts: int,
                 affinity_seconds: float = 0.0, max_queued_per_submitter: int = 0):
        self.factory = factory
        self.max_queued_per_submitter = max_queued_per_submitter
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.affinity_seconds = affinity_seconds
        self.workers = Workers(factory, lease_seconds)
        self.commands = Commands(factory, lease_seconds)

    @classmethod
    def from_settings(cls, settings: Settings) -> Queue:
        """The queue on LBS_DATABASE_URL with LBS_LEASE_SECONDS, LBS_MAX_ATTEMPTS,
        LBS_AFFINITY_SECONDS and LBS_MAX_QUEUED_PER_SUBMITTER."""
        return cls(session_factory(settings.database_url), lease_seconds=settings.lease_seconds,
                   max_attempts=settings.max_attempts,
                   affinity_seconds=settings.affinity_seconds,
                   max_queued_per_submitter=settings.max_queued_per_submitter)

    def _lease_end(self) -> datetime:
        return utcnow() + timedelta(seconds=self.lease_seconds)

    def submit(self, new_jobs: list[NewJob]) -> list[Job]:
        """Queue jobs (all or none), wake idle workers, and return the jobs.

        A job with `data_parallel` N > 1 is queued with N shards: rows of `jobs` with its
        id as `parent_id`, claimed, leased, resumed and cancelled like jobs; shard k
        evaluates the items whose idx % N == k and stores its samples on the job itself.
        Raises TooManyQueued (nothing queued) when a submitter would have more than
        `max_queued_per_submitter` rows waiting (a sharded job counts its shards)."""
        with write_session(self.factory) as session:
            if self.max_queued_per_submitter:
                self._check_cap(session, new_jobs)
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

    def _check_cap(self, session: Session, new_jobs: list[NewJob]) -> None:
        """Raise TooManyQueued if a submitter of `new_jobs` would pass the cap. A job
        waits as one row, a data-parallel job as its shards (the rows workers claim)."""
        adding: dict[str, int] = {}
        for j in new_jobs:
            adding[j.submitter] = adding.get(j.submitter, 0) + max(1, j.data_parallel)
        for submitter, count in sorted(adding.items()):
            if is_postgres(session):  # SQLite's write lock already orders submissions
                session.execute(sa.select(sa.func.pg_advisory_xact_lock(
                    zlib.crc32(f"lbs-submitter:{submitter}".encode()))))
            queued = session.scalar(
                sa.select(sa.func.count()).select_from(Job).where(
                    Job.submitter == submitter, Job.state == JobState.QUEUED.value,
                    # a sharded job waits as its shards
                    sa.or_(Job.parent_id.is_not(None), Job.shard_count.is_(None))))
            if queued + count > self.max_queued_per_submitter:
                raise TooManyQueued(submitter, queued, count, self.max_queued_per_submitter)

    def claim(self, worker_id: str, prefer_models: list[str] | None = None,
              capacity: Capacity | None = None) -> Job | None:
        """Take the next job `worker_id` can run (see `reads.next_queued` and
        scheduling.py), or None when there is none. `capacity` says what the worker can
        run (default: a CPU worker without labels). The job comes back running, leased
        for `lease_seconds`."""
        caps = capacity or Capacity()
        with write_session(self.factory) as session:
            now = utcnow()
            _requeue_expired(session, now, self.max_attempts)
            if caps.host and caps.gpu_indices:
                caps = less_reserved(caps, _host_workers(session, caps.host, worker_id), now,
                                     self.lease_seconds)
            job = next_queued(session, caps, prefer_models, self.affinity_seconds,
                              lock=is_postgres(session))
            if job is None:
                return None
            job_id = job.id
            claimed = session.execute(
                sa.update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value)
                .values(state=JobState.RUNNING.value, worker_id=worker_id,
                        lease_expires_at=now + timedelta(seconds=self.lease_seconds),
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

    def renew(self, job_id: int, worker_id: str) -> bool:
        """Extend the lease; returns whether cancel was requested. Raises LeaseLost."""
        with write_session(self.factory) as session:
            job = _owned(session, job_id, worker_id)
            job.lease_expires_at = self._lease_end()
            return job.cancel_requested

    def set_total(self, job_id: int, worker_id: str, total: int) -> bool:
        """The number of samples the job evaluates (for a shard: its whole job's), once
        its items are built; returns whether cancel was requested (a cancel that came
        while the data loaded stops the job before its first sample)."""
        with write_session(self.factory) as session:
            job = _owned(session, job_id, worker_id)
            job.progress_total = total
            if job.parent_id is not None:  # every shard knows the whole job's count
                session.execute(sa.update(Job).where(Job.id == job.parent_id)
                                .values(progress_total=total))
            return job.cancel_requested

    def record_manifest(self, job_id: int, worker_id: str, manifest: dict[str, Any]) -> None:
        """What the job runs with (backend.engine.manifest), once its model is loaded; a
        resumed job's replaces the earlier one (it may run on another machine)."""
        with write_session(self.factory) as session:
            _owned(session, job_id, worker_id).manifest = manifest

    def record_phase(self, job_id: int, worker_id: str, event: dict[str, Any],
                     renew: bool = True) -> None:
        """Show a download on the job: a `data_fetch` event (state, repo_id, bytes_done,
        bytes_total) or a `model_download` one (state, model) replaces the job's running
        one of its kind, so polling sees the bytes grow and the state change; the lease
        is renewed too (unless `renew` is False), since a large download may outlast it."""
        with write_session(self.factory) as session:
            job = _owned(session, job_id, worker_id)
            events = list(job.events or [])
            if events and events[-1].get("kind") == event["kind"] \
                    and events[-1].get("state") == "running":
                events[-1] = event
            else:
                events.append(event)
            job.events = events
            if renew:
                job.lease_expires_at = self._lease_end()

    def record_sample(self, job_id: int, worker_id: str, values: dict[str, Any]) -> bool:
        """Store one sample and renew the lease; returns whether cancel was requested.
        NUL characters in its text become U+FFFD. A shard stores it on its job, whose
        progress counts every shard's samples. A prediction is stored up to
        MAX_STORED_PREDICTION characters (`capped_prediction`)."""
        values = {key: storable_text(value) for key, value in capped_prediction(values).items()}
        with write_session(self.factory) as session:
            job = _owned(session, job_id, worker_id)
            session.add(Sample(job_id=job.parent_id or job_id, **values))
            if job.parent_id is not None:
                session.execute(sa.update(Job).where(Job.id == job.parent_id)
                                .values(progress_done=Job.progress_done + 1))
            job.progress_done = (job.progress_done or 0) + 1
            job.lease_expires_at = self._lease_end()
            return job.cancel_requested

    def finish(self, job_id: int, worker_id: str, state: JobState, *,
               scores: list[Any] = (), memory: list[tuple[str, str, int]] = (),
               events: list[dict[str, Any]] = (), error: str | None = None,
               aggregate: Callable[[list[tuple[dict, float]]], list[Any]] | None = None
               ) -> None:
        """Write the outcome of a job in one transaction. Raises LeaseLost.

        A shard keeps its memory peaks and events (not scores: its samples are a part of
        its job's); the last shard to end also ends its job, scored by `aggregate` (the
        dataset's) over all the job's samples."""
        with write_session(self.factory) as session:
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
                    sa.select(sa.func.count()).select_from(Sample)
                    .where(Sample.job_id == job_id))
            _worker_idle(session, worker_id)
            if job.parent_id is not None:
                session.flush()
                close_parent(session, job.parent_id, aggregate)

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued job at once, or ask its worker to stop a running one."""
        with write_session(self.factory) as session:
            # shards before their job, the order a shard's sample or end takes its locks in
            shards = session.scalars(sa.select(Job).where(Job.parent_id == job_id)
                                     .order_by(Job.id).with_for_update()).all()
            job = locked(session, job_id)
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
                close_parent(session, job.parent_id)
            return job

    def delete(self, job_id: int) -> None:
        """Delete a job that is not running, with its samples, scores, peaks and shards.
        A shard alone is not deleted (JobConflict): its job would lack its samples."""
        with write_session(self.factory) as session:
            job = locked(session, job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.state == JobState.RUNNING.value:
                raise JobConflict(f"job {job_id} is running; cancel it first")
            if job.parent_id is not None:  # its samples are a part of its job's
                raise JobConflict(f"job {job_id} is a shard of job {job.parent_id}; cancel "
                                  f"or delete job {job.parent_id} as a whole")
            for shard in session.scalars(sa.select(Job).where(Job.parent_id == job_id)):
                session.delete(shard)
            session.delete(job)
            if not is_postgres(session):
                floor = session.get(IdFloor, "jobs") or IdFloor(name="jobs", value=0)
                floor.value = max(floor.value, job_id)
                session.add(floor)

    def give_back(self, job_id: int, worker_id: str, error: str) -> JobState:
        """A worker whose CUDA context broke gives its running job back: queued again (it
        resumes after its stored samples on a fresh worker), or failed with `error` when
        it has had `max_attempts` attempts. The attempt counts, so a job that breaks
        every worker fails instead of restarting them for ever. Returns the new state."""
        with write_session(self.factory) as session:
            job = _owned(session, job_id, worker_id)
            _take_back(session, job, utcnow(), "cuda_error",
                       f"worker {worker_id}: {error} "
                       f"(attempt {job.attempts} of {self.max_attempts})",
                       self.max_attempts)
            if job.state == JobState.QUEUED.value:
                announce_work(session)
            _worker_idle(session, worker_id)
            return JobState(job.state)

    def requeue(self, job_id: int, worker_id: str) -> None:
        """Give a running job back to the queue (worker shutting down); it resumes later
        after its stored samples, and this start does not count as an attempt."""
        with write_session(self.factory) as session:
            job = _owned(session, job_id, worker_id)
            job.state = JobState.QUEUED.value
            job.worker_id = None
            job.lease_expires_at = None
            job.attempts = max(0, job.attempts - 1)
            job.events = [*job.events, {"kind": "requeued", "at": utcnow().isoformat(),
                                        "message": f"worker {worker_id} shut down"}]
            _worker_idle(session, worker_id)
            announce_work(session)
