"""The channel between the server and the model managers that live in the workers.

The model manager is in each worker process, never in the server. Workers
publish their manager's status to `worker_status` after every model move
(load, offload, restore, release), when a job ends before the job is marked
finished, right after a command, and about once a second for idle changes;
each status carries `as_of`, the time it describes. The server reads it and
marks the status of a worker whose heartbeat is stale. For changes (offload,
release, pin, timeout, limit, cleanup) the server writes one `control_commands`
row per target worker and waits for the worker to apply it (its control thread looks
every 0.2 s) and write the answer; so an HTTP answer reflects what the worker
really did, e.g. the MB a release actually returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.queue.db import (
    CommandState,
    ControlCommand,
    RuntimeSetting,
    WorkerRow,
    WorkerState,
    WorkerStatus,
    utcnow,
    write_session,
)
from backend.queue.scheduling import is_alive

COMMANDS = ("offload", "release", "pin", "unpin", "timeout", "limit", "cleanup")
PERSISTED = {"timeout": "gpu_idle_timeout", "limit": "memory_limit_bytes"}
"""Commands whose value is an operator setting: stored, and applied by each worker as
it starts (command -> runtime_settings name)."""


class NoWorker(RuntimeError):
    """No live worker to ask."""


class CommandTimeout(RuntimeError):
    """A worker did not answer in time (it may be busy loading a model)."""


@dataclass(frozen=True)
class Published:
    """A worker and the status it last published; `stale` when its heartbeat is."""

    worker: WorkerRow
    status: dict[str, Any]
    stale: bool


class Commands:
    """The server's side and the workers' side of the channel, over `factory`; a
    worker's status is stale once its heartbeat is older than
    `scheduling.stale_after(lease_seconds)`.

    - `send` writes one command row per live target worker in one transaction and
      polls for their answers; it raises NoWorker (no live target) or CommandTimeout
      (a target silent for `timeout` seconds: its rows are marked failed, so a late
      worker does not apply a command whose sender gave up).
    - A worker reads its `pending` commands, applies each and `complete`s it (one
      transaction per answer); it `publish_status`es first, so whoever reads the
      answer also reads the new state.
    - `store_setting` keeps the operator's value of a PERSISTED command, which each
      worker applies as it starts (`stored`).
    """

    def __init__(self, factory: sessionmaker, lease_seconds: float):
        self.factory = factory
        self.lease_seconds = lease_seconds

    def store_setting(self, command: str, args: dict[str, Any]) -> None:
        """Remember the operator's value for a PERSISTED command (its args)."""
        with write_session(self.factory) as session:
            row = session.get(RuntimeSetting, PERSISTED[command])
            if row is None:
                session.add(RuntimeSetting(name=PERSISTED[command], value=args,
                                           updated_at=utcnow()))
            else:
                row.value, row.updated_at = args, utcnow()

    def stored(self) -> list[tuple[str, dict[str, Any]]]:
        """The stored settings as (command, args) for a starting worker to apply."""
        with self.factory() as session:
            rows = {r.name: r.value for r in session.scalars(sa.select(RuntimeSetting))}
        return [(command, rows[name]) for command, name in PERSISTED.items() if name in rows]

    def publish_status(self, worker_id: str, status: dict[str, Any]) -> None:
        """Replace the worker's published status with `status`."""
        with write_session(self.factory) as session:
            row = session.get(WorkerStatus, worker_id)
            if row is None:
                session.add(WorkerStatus(worker_id=worker_id, status=status,
                                         updated_at=utcnow()))
            else:
                row.status, row.updated_at = status, utcnow()

    def statuses(self, worker: str | None = None) -> list[Published]:
        """The last status of every worker that did not stop (or of `worker`), oldest
        worker first; a worker that is not alive (scheduling.is_alive) is `stale`."""
        query = (sa.select(WorkerRow, WorkerStatus.status)
                 .join(WorkerStatus, WorkerStatus.worker_id == WorkerRow.id)
                 .where(WorkerRow.state != WorkerState.STOPPED.value)
                 .order_by(WorkerRow.started_at))
        if worker:
            query = query.where(WorkerRow.id == worker)
        now = utcnow()
        with self.factory() as session:
            return [Published(w, status, not is_alive(w, now, self.lease_seconds))
                    for w, status in session.execute(query).all()]

    def pending(self, worker_id: str) -> list[ControlCommand]:
        """The commands sent to `worker_id` not answered yet, oldest first."""
        with self.factory() as session:
            return list(session.scalars(sa.select(ControlCommand).where(
                ControlCommand.worker_id == worker_id,
                ControlCommand.state == CommandState.PENDING.value)
                .order_by(ControlCommand.id)))

    def complete(self, command_id: int, result: dict[str, Any] | None,
                 error: str | None = None) -> None:
        """Answer a command: done with `result`, or failed with `error`."""
        with write_session(self.factory) as session:
            row = session.get(ControlCommand, command_id)
            row.state = (CommandState.FAILED if error else CommandState.DONE).value
            row.result, row.error, row.done_at = result, error, utcnow()

    def prune(self, retention: timedelta) -> int:
        """Delete the commands sent before `retention` ago: answered, failed, or still
        pending for a worker that never took them (`send` stopped waiting for them
        long before). Returns how many went."""
        with self.factory.begin() as session:  # a blind write
            return session.execute(sa.delete(ControlCommand).where(
                ControlCommand.created_at < utcnow() - retention)).rowcount

    def send(self, command: str, args: dict[str, Any], worker: str | None = None,
             timeout: float = 20.0) -> list[dict[str, Any]]:
        """Ask every live worker (or `worker`) to run `command`; wait for their answers.

        Returns one {"worker_id", "ok", "result", "error"} per worker. Raises
        NoWorker when no live worker matches and CommandTimeout when one is silent.
        """
        assert command in COMMANDS, command
        targets = [p.worker.id for p in self.statuses(worker) if not p.stale]
        if not targets:
            raise NoWorker(f"worker {worker!r} is not running" if worker
                           else "no worker is running")
        with write_session(self.factory) as session:
            rows = [ControlCommand(worker_id=w, command=command, args=args,
                                   state=CommandState.PENDING.value) for w in targets]
            session.add_all(rows)
            session.flush()
            ids = [r.id for r in rows]
        deadline = time.monotonic() + timeout
        while True:
            with self.factory() as session:
                rows = list(session.scalars(sa.select(ControlCommand)
                                            .where(ControlCommand.id.in_(ids))))
            if all(r.state != CommandState.PENDING.value for r in rows):
                return [{"worker_id": r.worker_id, "ok": r.state == CommandState.DONE.value,
                         "result": r.result, "error": r.error}
                        for r in sorted(rows, key=lambda r: r.id)]
            if time.monotonic() > deadline:
                with write_session(self.factory) as session:
                    session.execute(sa.update(ControlCommand).where(
                        ControlCommand.id.in_(ids),
                        ControlCommand.state == CommandState.PENDING.value).values(
                        state=CommandState.FAILED.value, error="timed out"))
                silent = [r.worker_id for r in rows if r.state == CommandState.PENDING.value]
                raise CommandTimeout(f"no answer in {timeout:.0f} s from worker(s) "
                                     f"{', '.join(silent)}")
            time.sleep(0.05)
