"""What a cluster controller reads from the queue and writes back: the work waiting for
a pool of workers, the pool's busy workers, and the controller's decisions.

A pool is the workers one controller places (on Ray or Slurm), all alike: each holds
`gpus` GPUs and carries the pool's name among its labels (with the pool's own labels,
such as the GPU kind). A queued job or shard is work for the pool when a worker of the
pool could claim it (`scheduling.eligible`: its label, its GPU count; its memory
estimate is left to the worker, which reads its GPUs once placed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.queue.db import (
    ClusterDecision,
    Job,
    JobState,
    WorkerRow,
    WorkerState,
    utcnow,
    write_session,
)
from backend.queue.scheduling import Capacity, eligible, is_alive

DECISIONS_KEPT = timedelta(days=1)
"""How long decisions are kept (a controller looks every few seconds)."""


@dataclass(frozen=True)
class PoolShape:
    """The workers of one pool: its name (a label of each), its other labels, and
    the GPUs each worker holds (0: CPU workers)."""

    name: str
    labels: tuple[str, ...] = ()
    gpus: int = 1

    def capacity(self) -> Capacity:
        return Capacity(labels=(self.name, *self.labels), gpu_count=self.gpus)


@dataclass(frozen=True)
class PoolLoad:
    """What the queue holds for a pool now: `queued` jobs and shards a worker of the
    pool could claim, and `busy` live workers of the pool running one."""

    queued: int
    busy: int


class ClusterBook:
    """Reads of the queue for a pool and the controllers' decisions, through `factory`."""

    def __init__(self, factory: sessionmaker, lease_seconds: float):
        self.factory = factory
        self.lease_seconds = lease_seconds

    def load(self, pool: PoolShape) -> PoolLoad:
        """The queued work a worker of `pool` could claim (with running jobs whose lease
        expired), and the pool's busy workers."""
        now = utcnow()
        with self.factory() as session:
            claimable = eligible(pool.capacity())
            # a running job whose lease expired (its worker died) is work too: the next
            # claim sends it back to the queue, but only a live worker claims
            expired = sa.and_(Job.state == JobState.RUNNING.value,
                              Job.lease_expires_at < now, *claimable[1:])
            queued = session.scalar(sa.select(sa.func.count()).select_from(Job)
                                    .where(sa.or_(sa.and_(*claimable), expired)))
            busy = sum(1 for w in session.scalars(sa.select(WorkerRow))
                       if pool.name in (w.labels or []) and is_alive(w, now, self.lease_seconds)
                       and w.state == WorkerState.BUSY.value)
        return PoolLoad(queued=int(queued or 0), busy=busy)

    def record(self, pool: str, engine: str, load: PoolLoad, placed: int, started: int,
               message: str) -> None:
        """Store one decision; decisions older than DECISIONS_KEPT go."""
        with write_session(self.factory) as session:
            session.add(ClusterDecision(pool=pool, engine=engine, at=utcnow(),
                                        queued=load.queued, busy=load.busy, placed=placed,
                                        started=started, message=message))
            session.execute(sa.delete(ClusterDecision)
                            .where(ClusterDecision.at < utcnow() - DECISIONS_KEPT))

    def recent(self, limit: int = 20) -> list[ClusterDecision]:
        """The latest decisions of every pool, newest first."""
        with self.factory() as session:
            return list(session.scalars(sa.select(ClusterDecision)
                                        .order_by(ClusterDecision.id.desc()).limit(limit)))

    def latest(self) -> list[ClusterDecision]:
        """Each pool's latest decision, by pool name."""
        newest = sa.select(sa.func.max(ClusterDecision.id)).group_by(ClusterDecision.pool)
        with self.factory() as session:
            return list(session.scalars(sa.select(ClusterDecision)
                                        .where(ClusterDecision.id.in_(newest))
                                        .order_by(ClusterDecision.pool)))
