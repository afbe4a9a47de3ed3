"""Faults the harness survives: a worker killed mid-job (on SQLite and PostgreSQL), the
server restarted mid-job. Checked through the API and in the database: no lost and no
duplicated samples."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

from tests.conftest import ENGINES, LiveServer

pytestmark = pytest.mark.slow

LONG = {"context_lengths": [256, 512, 768, 1024, 1280, 1536], "depth_percents": {"count": 5},
        "max_new_tokens": 24}


def _wait_progress(server, job_id, at_least, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = server.request("GET", f"/api/jobs/{job_id}")[1]["data"]["job"]
        if job["progress"]["done"] >= at_least:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} made no progress:\n{server.log()[-3000:]}")


def _rows(data_dir, job_id, db_url=None):
    if db_url:
        import sqlalchemy as sa

        engine = sa.create_engine(db_url)
        try:
            with engine.connect() as conn:
                return tuple(conn.execute(sa.text(
                    "SELECT COUNT(*), COUNT(DISTINCT idx) FROM samples WHERE job_id=:j"),
                    {"j": job_id}).one())
        finally:
            engine.dispose()
    db = sqlite3.connect(data_dir / "lbs.sqlite3")
    try:
        return db.execute("SELECT COUNT(*), COUNT(DISTINCT idx) FROM samples WHERE job_id=?",
                          (job_id,)).fetchone()
    finally:
        db.close()


@pytest.mark.parametrize("db_url", ENGINES, indirect=True)
def test_worker_killed_mid_job_is_replaced_and_job_resumes(with_tiny, db_url):
    live = LiveServer(with_tiny, {"LBS_LEASE_SECONDS": "2"}).start()
    try:
        worker = live.wait_for_worker()
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "needle_in_haystack", "params": LONG})
        job_id = body["data"]["job"]["id"]
        before = _wait_progress(live, job_id, 3)["progress"]["done"]
        os.kill(worker["pid"], signal.SIGKILL)
        job = live.wait_for(job_id, ("succeeded", "failed"), timeout=240)
        assert job["state"] == "succeeded", job["error"]
        assert job["attempts"] == 2
        assert any(e["kind"] == "lease_expired" for e in job["events"])
        assert job["progress"] == {"done": 30, "total": 30}
        assert _rows(with_tiny, job_id, db_url) == (30, 30), "one row per sample, none twice"
        workers = live.request("GET", "/api/workers")[1]["data"]["workers"]
        assert any(w["alive"] and w["pid"] != worker["pid"] for w in workers)
        assert "exited with -9 after" in live.log() and "restarting in 1 s" in live.log()
        assert before >= 3
    finally:
        live.stop()


def test_server_restart_resumes_running_and_queued_jobs(with_tiny):
    live = LiveServer(with_tiny).start()
    live.wait_for_worker()
    status, body = live.request("POST", "/api/jobs", {"jobs": [
        {"model": "builtin:tiny", "dataset": "needle_in_haystack", "params": LONG},
        {"model": "builtin:tiny", "dataset": "needle_in_haystack",
         "params": {"context_lengths": [256], "depth_percents": [50], "max_new_tokens": 4}}]})
    first, second = (j["id"] for j in body["data"]["jobs"])
    done_before = _wait_progress(live, first, 3)["progress"]["done"]
    live.stop()  # SIGTERM: the worker stops between samples and gives the job back
    stopped = sqlite3.connect(with_tiny / "lbs.sqlite3")
    state = stopped.execute("SELECT state FROM jobs WHERE id=?", (first,)).fetchone()[0]
    stopped.close()
    assert state == "queued"
    again = LiveServer(with_tiny, {"LBS_PORT": str(live.port)})
    again.port, again.url = live.port, live.url
    again.start()
    try:
        job = again.wait_for(first, ("succeeded", "failed"), timeout=240)
        assert job["state"] == "succeeded", job["error"]
        assert job["attempts"] == 1  # a clean shutdown does not use up an attempt
        assert any(e["kind"] == "requeued" for e in job["events"])
        assert _rows(with_tiny, first) == (30, 30)
        assert again.wait_for(second, ("succeeded", "failed"))["state"] == "succeeded"
        assert done_before >= 3
    finally:
        again.stop()
