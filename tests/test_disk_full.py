"""A full disk is a 507 with a sentence, not a 500: on submit and cancel, SQLite's
"database or disk is full" (made for real with `PRAGMA max_page_count`, the most pages
the database may have), PostgreSQL's disk_full and an OSError ENOSPC. Nothing is
half-written: the job the 507 refused is not there, and the one a cancel could not
stop is still queued once there is room."""

from __future__ import annotations

import errno

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from backend.queue.db import Job, get_engine

NIAH = {"context_lengths": [256], "depth_percents": [0], "max_new_tokens": 4}


@pytest.fixture
def full_disk(app, settings):
    """Call it to make the database as full as it is now: every page it holds is the
    last it may have (each new connection and the pooled ones)."""
    engine = get_engine(settings.database_url)

    def fill(dbapi_conn, _record=None):
        cur = dbapi_conn.cursor()
        pages = cur.execute("PRAGMA page_count").fetchone()[0]
        cur.execute(f"PRAGMA max_page_count = {pages}")
        cur.close()

    def make_full() -> None:
        event.listen(engine, "connect", fill)
        engine.dispose()  # the pooled connections reconnect, with the limit

    yield make_full
    if event.contains(engine, "connect", fill):
        event.remove(engine, "connect", fill)
    engine.dispose()


def _body(shards: int = 1) -> dict:
    return {"model": "builtin:tiny", "dataset": "needle_in_haystack", "params": NIAH,
            "data_parallel": shards}


def test_submit_and_cancel_on_a_full_sqlite_database_are_507(client, factory, full_disk):
    queued = client.post("/api/jobs", json=_body(64)).get_json()["data"]["job"]["id"]
    full_disk()
    res = client.post("/api/jobs", json={"jobs": [_body(64)] * 4})
    assert res.status_code == 507, res.get_json()
    error = res.get_json()["error"]
    assert error["code"] == "insufficient_storage"
    assert "full" in error["message"] and "nothing was changed" in error["message"], error
    res = client.post(f"/api/jobs/{queued}/cancel")
    assert res.status_code == 507, res.get_json()
    with factory() as session:  # nothing half-written
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)
                              .where(Job.parent_id.is_(None))) == 1
        assert session.get(Job, queued).state == "queued"


def test_postgres_disk_full_and_enospc_are_507_too(app, client, monkeypatch):
    import psycopg

    from backend.queue.jobs import Queue

    def disk_full(self, jobs):
        raise sa.exc.OperationalError("INSERT ...", {}, psycopg.errors.DiskFull(
            "could not extend file \"base/16384/16385\": No space left on device"))

    monkeypatch.setattr(Queue, "submit", disk_full)
    res = client.post("/api/jobs", json=_body())
    assert res.status_code == 507 and "full" in res.get_json()["error"]["message"]

    def no_space(self, job_id):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Queue, "cancel", no_space)
    res = client.post("/api/jobs/1/cancel")
    assert res.status_code == 507 and "full" in res.get_json()["error"]["message"]
