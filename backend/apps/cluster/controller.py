"""The controller that scales a pool of workers with the queue, on any engine that can
place workers (Ray, Slurm).

Every few seconds it reads the work a worker of the pool could claim (queued jobs and
shards, by their label and GPU count) and the pool's busy workers, asks the engine how
many workers it holds (starting, idle or busy: ended ones are reaped), and asks for
more, up to `max_workers`. It never stops a worker: a worker placed with an idle exit
ends by itself once it finds nothing to run for that long, so an empty queue holds no
GPU; a worker that died (killed, its node lost) is no longer held and is replaced when
there is work, while the lease of the job it ran sends that job to another worker.
Each decision is logged and stored (`ClusterBook.record`) for the Workers view.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from backend.common.config import SETTINGS, Settings
from backend.queue.cluster import ClusterBook, PoolLoad, PoolShape
from backend.queue.db import session_factory

log = logging.getLogger(__name__)

DEFAULTS = {s.name: s.default for s in SETTINGS}


class WorkerEngine(Protocol):
    """What places the pool's workers. `name`: "ray" or "slurm"."""

    name: str

    def placed(self) -> int:
        """Workers held now (asked for and not ended: starting, idle or busy); forgets
        those that ended, however they ended."""

    def place(self, count: int) -> None:
        """Ask for `count` more workers, each running the worker loop against the queue
        with the pool's GPUs and labels, and the pool's idle exit."""

    def close(self) -> None:
        """Stop every worker still held (the controller is shutting down)."""


@dataclass(frozen=True)
class ScalePolicy:
    """`min_workers` are always held (replaced when they die); up to `max_workers`
    while there is work for them. `idle_exit_s`: how long a worker finding nothing to
    run waits before it exits (None: never, for a fixed pool). `interval_s`: how often
    the controller looks at the queue."""

    max_workers: int
    min_workers: int = 0
    idle_exit_s: float | None = 120.0
    interval_s: float = 2.0


def workers_to_start(load: PoolLoad, placed: int, policy: ScalePolicy) -> int:
    """How many workers to ask for: one per queued job or shard that no placed worker
    is free for (those held and not busy are starting or idle, and will claim one),
    within `max_workers`; at least enough to hold `min_workers`."""
    free = max(0, placed - load.busy)
    wanted = max(load.queued - free, policy.min_workers - placed)
    return max(0, min(wanted, policy.max_workers - placed))


class Controller:
    """Scales `engine`'s workers of `pool` with the queue of `settings` (see module)."""

    def __init__(self, settings: Settings, pool: PoolShape, engine: WorkerEngine,
                 policy: ScalePolicy):
        self.pool, self.engine, self.policy = pool, engine, policy
        self.book = ClusterBook(session_factory(settings.database_url), settings.lease_seconds)
        self._last: tuple[int, int, int, int] | None = None

    def step(self) -> int:
        """Look at the queue once and ask for the workers it needs; the number asked for."""
        load = self.book.load(self.pool)
        placed = self.engine.placed()
        start = workers_to_start(load, placed, self.policy)
        if start:
            self.engine.place(start)
        seen = (load.queued, load.busy, placed, start)
        if seen != self._last:  # a decision worth keeping: something changed
            self._last = seen
            message = (f"{load.queued} queued for the pool, {load.busy} busy, {placed} held: "
                       + (f"asked {self.engine.name} for {start} more" if start else
                          "holding" if placed else "no worker held (no GPU in use)"))
            log.info("[Cluster] %s: %s", self.pool.name, message)
            self.book.record(self.pool.name, self.engine.name, load, placed, start, message)
        return start

    def run(self, stop: threading.Event) -> None:
        """Step every `interval_s` until `stop` is set; then stop the workers held. A
        failed step (the database or the engine busy) is logged and tried again."""
        log.info("[Cluster] %s: scaling %s workers with the queue (%d to %d, idle exit %s)",
                 self.pool.name, self.engine.name, self.policy.min_workers,
                 self.policy.max_workers,
                 "off" if self.policy.idle_exit_s is None else f"{self.policy.idle_exit_s:g} s")
        try:
            while not stop.is_set():
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - the controller outlives a bad moment
                    log.exception("[Cluster] %s: step failed; trying again", self.pool.name)
                stop.wait(self.policy.interval_s)
        finally:
            self.engine.close()


def worker_overrides(settings: Settings, pool: PoolShape) -> dict[str, str]:
    """The settings a placed worker runs with, by variable name: those set here (the
    database above all) and the pool's labels (its name first). The worker's other
    settings are read where it runs."""
    overrides = {name: text for name, text in settings.raw.items()
                 if text != DEFAULTS.get(name)}
    overrides["LBS_WORKER_LABELS"] = ",".join(
        dict.fromkeys((pool.name, *pool.labels, *settings.worker_labels)))
    return overrides
