"""Which queued job a worker takes next, and why a queued job waits.

Order: higher `priority` first; within a priority, round robin over
submitters — the submitter whose last claim is oldest (or who never had one)
goes first, so one user's 200 jobs do not starve another's 2 — then the oldest
job of that submitter. A worker only sees the jobs it can run (`Capacity`):

- `worker_label`: a job pinned to a label runs only on a worker that has it
  (LBS_WORKER_LABELS, the host name and the worker id are a worker's labels);
- `num_gpus`: at most the worker's GPU count (a worker without a GPU runs
  one-device jobs on the CPU, so a laptop needs no settings);
- `memory_bytes`: the job's GPU memory estimate (made at submit) fits the
  memory the worker can give now, under LBS_GPU_MEMORY_LIMIT, on the GPUs the job
  would use: a job of `num_gpus` n runs on the worker's first n GPUs (a one-GPU
  job on its first), so it is admitted against their sum, never against GPUs it
  will not touch. Workers of one host on the same GPU take off what the others
  reserved there for jobs whose memory NVML does not show yet (`less_reserved`).

Nothing here writes; `Queue.claim` (jobs.py) locks and takes the row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from backend.common.commands import lbs_command
from backend.common.units import format_bytes
from backend.queue.db import Job, JobState, WorkerRow, WorkerState


@dataclass(frozen=True)
class Capacity:
    """What a claiming worker offers.

    `labels`: it runs jobs pinned to any of them. `gpu_count`: the GPUs it holds
    (0 = a CPU worker, which runs jobs of num_gpus <= 1). `free_gpu_bytes`: the GPU
    memory each of its GPUs can give a job now, in CUDA order; None admits every job
    (no GPU, or unmeasured). `host` and `gpu_indices` (the NVML index of each GPU, in
    CUDA order): which physical GPUs those are, so that what other workers of the host
    reserved on them is taken off (`shared_gpu_reservations`).
    """

    labels: tuple[str, ...] = ()
    gpu_count: int = 0
    free_gpu_bytes: tuple[int, ...] | None = None
    host: str | None = None
    gpu_indices: tuple[int, ...] = ()


def shares_gpus(caps: Capacity, worker: WorkerRow) -> bool:
    """Whether `worker` runs on one of the GPUs `caps` offers (the same host's)."""
    return bool(caps.host and caps.gpu_indices and worker.host == caps.host
                and {int(g["index"]) for g in worker.gpus or []} & set(caps.gpu_indices))


def less_reserved(caps: Capacity, others: Iterable[WorkerRow], now: datetime,
                  lease_seconds: float) -> Capacity:
    """`caps` less what the live workers among `others` that share its GPUs reserved
    on them for jobs they claimed (WorkerRow.gpu_reserved): NVML's free memory shows
    a claimed job only once its model has loaded, and its KV cache only once it runs."""
    if caps.free_gpu_bytes is None or not caps.gpu_indices:
        return caps
    taken = dict.fromkeys(caps.gpu_indices, 0)
    for worker in others:
        if worker.current_job_id is None or not is_alive(worker, now, lease_seconds) \
                or not shares_gpus(caps, worker):
            continue
        for index, nbytes in (worker.gpu_reserved or {}).items():
            if int(index) in taken:
                taken[int(index)] += int(nbytes)
    free = tuple(max(0, f - taken.get(i, 0))
                 for f, i in zip(caps.free_gpu_bytes, caps.gpu_indices, strict=False))
    return replace(caps, free_gpu_bytes=free + caps.free_gpu_bytes[len(free):])


def room_for(num_gpus: int, free_per_gpu: list[int] | tuple[int, ...]) -> int:
    """GPU memory a job of `num_gpus` can use on a worker whose GPUs have
    `free_per_gpu` available: the sum over the first `num_gpus` (where it runs)."""
    return sum(free_per_gpu[:max(1, num_gpus)])


def eligible(caps: Capacity) -> list[Any]:
    """WHERE conditions of the queued jobs a worker with `caps` may claim."""
    conditions = [Job.state == JobState.QUEUED.value,
                  Job.num_gpus <= max(caps.gpu_count, 1),
                  # a data-parallel job is run by its shards, never claimed itself
                  sa.or_(Job.shard_count.is_(None), Job.parent_id.isnot(None))]
    label_free = Job.worker_label.is_(None)
    conditions.append(sa.or_(label_free, Job.worker_label.in_(caps.labels))
                      if caps.labels else label_free)
    if caps.gpu_count and caps.free_gpu_bytes is not None:
        free = caps.free_gpu_bytes
        conditions.append(sa.or_(Job.memory_bytes.is_(None), *(
            sa.and_(Job.num_gpus == n, Job.memory_bytes <= room_for(n, free))
            for n in range(1, max(len(free), 1) + 1))))
    return conditions


def _claim_order() -> tuple[Any, ...]:
    """ORDER BY of the queue: priority, then the submitter served longest ago, then age."""
    earlier = aliased(Job)
    last_claim = (sa.select(sa.func.max(earlier.claimed_at))
                  .where(earlier.submitter == Job.submitter).scalar_subquery())
    return Job.priority.desc(), last_claim.asc().nulls_first(), Job.id


def ordered(caps: Capacity) -> sa.Select:
    """The claimable jobs (id, model, priority, created_at) in the order they should run."""
    return (sa.select(Job.id, Job.model, Job.priority, Job.created_at)
            .where(*eligible(caps)).order_by(*_claim_order()))


def stale_after(lease_seconds: float) -> timedelta:
    """A worker whose last heartbeat is older than this is lost (it beats every <= 5 s)."""
    return timedelta(seconds=max(15.0, lease_seconds))


def worker_state(worker: WorkerRow, now: datetime, lease_seconds: float) -> WorkerState:
    """The state to show: the stored one, or LOST when the heartbeats stopped."""
    state = WorkerState(worker.state)
    if state in (WorkerState.IDLE, WorkerState.BUSY) and \
            now - worker.heartbeat_at > stale_after(lease_seconds):
        return WorkerState.LOST
    return state


def is_alive(worker: WorkerRow, now: datetime, lease_seconds: float) -> bool:
    """Idle or busy, and heartbeating."""
    return worker_state(worker, now, lease_seconds) in (WorkerState.IDLE, WorkerState.BUSY)


def _room(worker: WorkerRow, num_gpus: int) -> int | None:
    """What a job of `num_gpus` could use on `worker` at its last heartbeat (see
    `room_for`), from each GPU's `available_bytes`; None when unmeasured."""
    gpus = worker.gpus or []
    if gpus and all("available_bytes" in g for g in gpus):
        return room_for(num_gpus, [int(g["available_bytes"]) for g in gpus])
    if gpus and all("free_bytes" in g for g in gpus):
        return room_for(num_gpus, [int(g["free_bytes"]) for g in gpus])
    return worker.gpu_free_bytes


def waiting_reason(job: Job, workers: Iterable[WorkerRow], now: datetime,
                   lease_seconds: float, ahead: int = 0) -> str | None:
    """Why a queued job does not run yet, in words; None for a job that is not queued.
    `ahead`: the queued jobs before it in the claim order."""
    if job.state != JobState.QUEUED.value:
        return None
    live = [w for w in workers if is_alive(w, now, lease_seconds)]
    if not live:
        return f"no live worker: start one ({lbs_command('worker')}) or check the server log"
    if job.worker_label:
        live = [w for w in live if job.worker_label in (w.labels or [])]
        if not live:
            return f"pinned to worker label {job.worker_label!r}, which no live worker has"
    fitting = [w for w in live if max(w.gpu_count or 0, 1) >= job.num_gpus]
    if not fitting:
        most = max(w.gpu_count or 0 for w in live)
        return f"needs {job.num_gpus} GPUs on one worker; the most a live worker holds is {most}"
    if job.memory_bytes:
        room = {w.id: _room(w, job.num_gpus) for w in fitting}
        roomy = [w for w in fitting if not w.gpu_count or room[w.id] is None
                 or room[w.id] >= job.memory_bytes]
        if not roomy:
            most = max(room[w.id] or 0 for w in fitting)
            return (f"needs about {format_bytes(job.memory_bytes, 1)} of GPU memory (weights, "
                    f"KV cache and activations at its longest context); the most a matching worker "
                    f"has free is {format_bytes(most, 1)}")
    if all(w.state == WorkerState.BUSY.value for w in fitting):
        return f"waiting for a free worker ({len(fitting)} able to run it, all busy)"
    if not ahead:
        return "next in line: an idle worker takes it within a few seconds"
    return (f"waiting for its turn: {ahead} queued job{'s' if ahead != 1 else ''} before it "
            "(higher priorities first, then each submitter in turn)")


def queued_reasons(session: Session, jobs: list[Job], now: datetime,
                   lease_seconds: float) -> dict[int, str]:
    """`waiting_reason` of each queued job in `jobs`, reading the workers once."""
    queued = [job for job in jobs if job.state == JobState.QUEUED.value]
    if not queued:
        return {}
    workers = session.scalars(sa.select(WorkerRow)).all()
    order = session.scalars(
        sa.select(Job.id).where(Job.state == JobState.QUEUED.value,
                                sa.or_(Job.shard_count.is_(None), Job.parent_id.isnot(None)))
        .order_by(*_claim_order())).all()
    place = {job_id: i for i, job_id in enumerate(order)}
    return {job.id: reason for job in queued
            if (reason := waiting_reason(job, workers, now, lease_seconds,
                                         place.get(job.id, 0)))}
