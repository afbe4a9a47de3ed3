"""The worker registry: one row per worker process in `workers`, its heartbeats, and
what each reserved on its GPUs.

A worker registers as it starts, beats every few seconds (`heartbeat`), and a worker
whose heartbeats stopped for `scheduling.stale_after(lease_seconds)` counts as lost:
its job goes back to the queue when its lease expires (`Queue.claim`). Rows of workers
dead for `DEAD_WORKER_RETENTION` are pruned; a worker that was only asleep registers
again on its next heartbeat.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.queue.db import WorkerRow, WorkerState, WorkerStatus, utcnow, write_session
from backend.queue.scheduling import is_alive, stale_after, worker_state

DEAD_WORKER_RETENTION = timedelta(days=7)
"""How long the row and the published status of a worker whose heartbeats stopped are
kept (it shows as lost or stopped in /api/workers meanwhile); control commands answered
or expired that long ago go too (Commands.prune)."""


class Workers:
    """The workers' rows, read and written through `factory`; a worker is alive while
    its heartbeat is younger than `scheduling.stale_after(lease_seconds)`.

    Every write is one transaction. `register` and `mark_lost` read before they write
    and hold the write lock (SQLite) or lock the rows (PostgreSQL); `heartbeat` and
    `reserve` are blind writes of the worker's own row. Nothing here raises on a
    missing worker: `heartbeat` says so in its answer, reads return what there is."""

    def __init__(self, factory: sessionmaker, lease_seconds: float):
        self.factory = factory
        self.lease_seconds = lease_seconds

    def register(self, worker_id: str, host: str, pid: int, device: str, *,
                 labels: tuple[str, ...] | list[str] = (),
                 gpus: list[dict[str, Any]] | None = None,
                 gpu_free_bytes: int | None = None,
                 current_job_id: int | None = None) -> None:
        """Insert or refresh the worker's row: where it runs, its labels and its GPUs
        (`gpus`: index, name, total_bytes, free_bytes per GPU; empty for a CPU worker),
        idle, or busy with `current_job_id` (a worker whose row was pruned while it
        slept)."""
        with write_session(self.factory) as session:
            worker = session.get(WorkerRow, worker_id, with_for_update=True) \
                or WorkerRow(id=worker_id)
            worker.host, worker.pid, worker.device = host, pid, device
            worker.state = (WorkerState.IDLE if current_job_id is None
                            else WorkerState.BUSY).value
            worker.current_job_id = current_job_id
            worker.labels, worker.gpus = list(labels), list(gpus or [])
            worker.gpu_count, worker.gpu_free_bytes = len(worker.gpus), gpu_free_bytes
            worker.started_at = worker.heartbeat_at = utcnow()
            session.add(worker)

    def heartbeat(self, worker_id: str, state: str | None = None, *,
                  gpus: list[dict[str, Any]] | None = None,
                  gpu_free_bytes: int | None = None) -> bool:
        """Refresh the worker's heartbeat (and its state and GPU readings when given).
        A worker marked lost that beats again is back: idle, or busy with its job.
        Returns False when the worker has no row (pruned: see `prune`), so that it
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
        with self.factory.begin() as session:  # a blind write: no need for SQLite's lock first
            return session.execute(sa.update(WorkerRow).where(WorkerRow.id == worker_id)
                                   .values(**values)).rowcount > 0

    def mark_lost(self) -> list[str]:
        """Mark workers whose heartbeats stopped as lost; returns their ids. Their jobs go
        back to the queue when their leases expire (in the next claim)."""
        cutoff = utcnow() - stale_after(self.lease_seconds)
        with write_session(self.factory) as session:
            lost = session.scalars(sa.select(WorkerRow).where(
                WorkerRow.state.in_([WorkerState.IDLE.value, WorkerState.BUSY.value]),
                WorkerRow.heartbeat_at < cutoff).with_for_update(skip_locked=True)).all()
            for worker in lost:
                worker.state = WorkerState.LOST.value
            return [w.id for w in lost]

    def prune(self, retention: timedelta = DEAD_WORKER_RETENTION) -> list[str]:
        """Delete the workers whose last heartbeat is older than `retention`, with their
        status rows (and status rows of no worker as old); returns the ids deleted. A
        worker that was only asleep registers again on its next heartbeat."""
        cutoff = utcnow() - retention
        with write_session(self.factory) as session:
            gone = list(session.scalars(sa.select(WorkerRow.id).where(
                WorkerRow.heartbeat_at < cutoff)))
            session.execute(sa.delete(WorkerStatus).where(
                WorkerStatus.worker_id.in_(gone)
                | ((WorkerStatus.updated_at < cutoff)
                   & WorkerStatus.worker_id.not_in(sa.select(WorkerRow.id)))))
            session.execute(sa.delete(WorkerRow).where(WorkerRow.id.in_(gone)))
            return gone

    def all(self) -> list[WorkerRow]:
        """Every worker's row, the earliest started first (stopped and lost ones too)."""
        with self.factory() as session:
            return list(session.scalars(sa.select(WorkerRow)
                                        .order_by(WorkerRow.started_at)).all())

    def live(self) -> list[dict[str, Any]]:
        """The live workers and the GPU memory each has free for a job (None: a CPU
        worker, bounded by RAM only)."""
        now = utcnow()
        return [{"id": w.id, "host": w.host, "state": w.state, "gpu_count": w.gpu_count or 0,
                 "gpu_free_bytes": w.gpu_free_bytes if w.gpu_count else None}
                for w in self.all() if is_alive(w, now, self.lease_seconds)]

    def idle_count(self, worker_label: str | None = None, num_gpus: int = 1) -> int:
        """Workers alive and idle now that could run a job with this label and GPU count,
        counting workers that share a GPU once (LBS_WORKERS above the GPU count: shards
        on one GPU would wait for each other's memory): what `data_parallel: "auto"`
        spreads a job over (at least 1)."""
        now = utcnow()
        count, taken = 0, set()  # (host, NVML index) of the GPUs counted
        with self.factory() as session:
            for worker in session.scalars(sa.select(WorkerRow).order_by(WorkerRow.id)):
                if worker_state(worker, now, self.lease_seconds) != WorkerState.IDLE:
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

    def reserve(self, worker_id: str, reserved: dict[str, int] | None) -> None:
        """What the worker's job will still take on each of its GPUs beyond what NVML
        shows (see WorkerRow.gpu_reserved): lowered once its model has loaded, None when
        it ended."""
        with self.factory.begin() as session:  # a blind write of the worker's own row
            session.execute(sa.update(WorkerRow).where(WorkerRow.id == worker_id)
                            .values(gpu_reserved=reserved))

    def reservations(self, worker_id: str) -> dict[str, int] | None:
        """What `reserve` (or the worker's last claim) left on the worker's GPUs."""
        with self.factory() as session:
            return session.scalar(sa.select(WorkerRow.gpu_reserved)
                                  .where(WorkerRow.id == worker_id))
