"""An idle worker on SQLite costs little: while nobody commits, its wait between two
looks at the queue reads no table (it asks SQLite whether anything was committed,
PRAGMA data_version), and it still wakes within a fraction of a second when a job
is queued. bench/idle_worker.py measures the CPU."""

from __future__ import annotations

import threading
import time

from sqlalchemy import event

from backend.queue.db import get_engine
from backend.queue.jobs import NewJob
from backend.queue.notify import WorkWaiter
from tests.conftest import queue_on


def test_an_idle_wait_reads_no_table_and_still_sees_new_work(settings, factory):
    engine = get_engine(settings.database_url)
    reads: list[str] = []

    def count(conn, cursor, statement, *args):
        if "FROM jobs" in statement:
            reads.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        waiter = WorkWaiter(settings.database_url)
        waiter.mark()
        reads.clear()
        assert waiter.wait(1.0, 1.0, threading.Event()) is False  # 20 looks, nothing new
        assert len(reads) <= 1, f"{len(reads)} reads of the jobs table in an idle second"

        waiter.mark()
        threading.Timer(0.3, lambda: queue_on(factory).submit(
            [NewJob("builtin:tiny", "needle_in_haystack", {})])).start()
        started = time.monotonic()
        assert waiter.wait(5.0, 5.0, threading.Event()) is True
        assert time.monotonic() - started < 1.5
        waiter.close()
    finally:
        event.remove(engine, "before_cursor_execute", count)
