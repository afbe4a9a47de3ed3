"""Waking idle workers when work arrives.

On PostgreSQL a transaction that queues work calls `announce_work(session)`
(NOTIFY, delivered when it commits) and idle workers block in
`WorkWaiter.wait()` on a LISTEN connection of their own, so a new job starts
within milliseconds while idle workers stay off the database. SQLite has no
such channel, and a claim there takes the database's write lock, so idle
workers do not claim in a loop: every 50 ms they ask SQLite whether anyone
committed since (`PRAGMA data_version`, a counter read that touches no table),
and only then read how many jobs are queued (a read in WAL mode blocks no one),
trying a claim when that changed, or after the poll interval at the latest;
`announce_work` does nothing. An idle worker thus costs little CPU while nothing
happens (bench/idle_worker.py).
"""

from __future__ import annotations

import logging
import threading
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.queue.db import Job, JobState, get_engine, is_postgres, session_factory

log = logging.getLogger(__name__)

CHANNEL = "lbs_jobs"


def announce_work(session: Session) -> None:
    """Tell idle workers that jobs became claimable (PostgreSQL; sent at commit)."""
    if is_postgres(session):
        session.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


class CommitWatch:
    """Whether anyone committed to the database since the last look, for loops that
    poll it: on SQLite `PRAGMA data_version` on a connection of its own (a counter,
    no table read); on PostgreSQL always True (its loops do not poll: LISTEN)."""

    def __init__(self, database_url: str):
        self._url = database_url
        self._sqlite = None
        self._version: int | None = None

    def committed_since(self) -> bool:
        """True the first time, then whether another connection committed since."""
        if not self._url.startswith("sqlite"):
            return True
        if self._sqlite is None:  # data_version is per connection: keep this one
            self._sqlite = get_engine(self._url).raw_connection()
        version = self._sqlite.cursor().execute("PRAGMA data_version").fetchone()[0]
        changed, self._version = version != self._version, version
        return changed

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()  # back to the pool
            self._sqlite = None


class WorkWaiter:
    """What an idle worker waits on between two looks at the queue.

    Call `mark()` before each claim attempt, then `wait(poll, listen_timeout,
    stop)`, which returns when work may be there: on PostgreSQL after a
    notification, or after `listen_timeout` seconds at most (expired leases and
    jobs waiting for memory are found by looking, not announced); on SQLite as
    soon as the queued jobs changed since `mark()`, or after `poll` seconds. It
    returns early when `stop` is set. A lost LISTEN connection is reopened on
    the next wait; meanwhile the worker falls back to polling.
    """

    CHECK_EVERY = 0.05
    """SQLite: seconds between two reads of the queue's signature."""

    def __init__(self, database_url: str):
        url = sa.engine.make_url(database_url)
        self._url = database_url
        self._conninfo = (url.set(drivername="postgresql").render_as_string(hide_password=False)
                          if url.get_backend_name() == "postgresql" else None)
        self._conn = None
        self._marked: tuple | None = None
        self._watch: CommitWatch | None = None  # SQLite: has anyone committed?

    def _signature(self) -> tuple:
        with session_factory(self._url)() as session:
            return tuple(session.execute(
                sa.select(sa.func.count(), sa.func.max(Job.id))
                .where(Job.state == JobState.QUEUED.value)).one())

    def _committed_since(self) -> bool:
        if self._watch is None:
            self._watch = CommitWatch(self._url)
        return self._watch.committed_since()

    def mark(self) -> None:
        """Remember the queue as it is before a claim (SQLite); nothing on PostgreSQL."""
        if self._conninfo is None:
            self._marked = self._signature()

    @property
    def listening(self) -> bool:
        return self._conninfo is not None

    def _connect(self):
        if self._conn is None or self._conn.closed:
            import psycopg

            self._conn = psycopg.connect(self._conninfo, autocommit=True)
            self._conn.execute(f"LISTEN {CHANNEL}")
        return self._conn

    def wait(self, poll: float, listen_timeout: float, stop: threading.Event) -> bool:
        """Sleep until work may be there; True when new work was seen."""
        if self._conninfo is None:
            deadline = time.monotonic() + poll
            while not stop.wait(min(self.CHECK_EVERY, max(0.0, deadline - time.monotonic()))):
                if self._marked is not None and self._committed_since() \
                        and self._signature() != self._marked:
                    return True
                if time.monotonic() >= deadline:
                    break
            return False
        try:
            conn = self._connect()
            # Short slices so that `stop` is honoured within a fraction of a second.
            remaining = listen_timeout
            while remaining > 0 and not stop.is_set():
                slice_s = min(0.5, remaining)
                for _ in conn.notifies(timeout=slice_s, stop_after=1):
                    return True
                remaining -= slice_s
        except Exception as exc:  # noqa: BLE001 - fall back to polling; reconnect next time
            log.warning("[Worker] LISTEN connection failed (%s); polling instead", exc)
            self.close()
            stop.wait(poll)
        return False

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
            self._conn = None
