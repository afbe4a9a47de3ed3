"""Many clients at once against a real server while its worker runs a job: every
submit, poll, list and cancel answers 2xx, nothing submitted is lost, and the
running job finishes with one row per sample."""

from __future__ import annotations

import http.client
import json
import random
import sqlite3
import threading
import time

from tests.conftest import LiveServer

NIAH = "needle_in_haystack"
RUNNING = {"context_lengths": [512, 1024], "depth_percents": {"count": 6},
           "max_new_tokens": 24}
SMALL = {"context_lengths": [256], "depth_percents": [50], "max_new_tokens": 2}
CLIENTS = 16
SECONDS = 6.0


def _call(conn, method, path, body=None):
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    return res.status, json.loads(res.read() or b"null")


def test_many_clients_while_a_job_runs(with_tiny):
    live = LiveServer(with_tiny).start()
    try:
        live.wait_for_worker()
        status, body = live.request("POST", "/api/jobs", {"model": "builtin:tiny",
                                                          "dataset": NIAH, "params": RUNNING})
        assert status == 201, body
        running = body["data"]["job"]["id"]
        live.wait_for(running, ("running",), timeout=60)

        submitted: list[int] = []
        problems: list[str] = []
        counts = {"requests": 0}
        lock = threading.Lock()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
            mine, bad, n = [], [], 0
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline:
                roll = rng.random()
                try:
                    if roll < 0.15:
                        status, body = _call(conn, "POST", "/api/jobs", {
                            "model": "builtin:tiny", "dataset": NIAH, "params": SMALL})
                        if status == 201:
                            mine.append(body["data"]["job"]["id"])
                        expected = (201,)
                    elif roll < 0.25 and mine:
                        status, body = _call(conn, "POST", f"/api/jobs/{mine[-1]}/cancel")
                        expected = (200, 409)  # 409: it had already finished
                    elif roll < 0.6:
                        status, body = _call(conn, "GET", f"/api/jobs/{running}")
                        expected = (200,)
                    elif roll < 0.9:
                        status, body = _call(conn, "GET", "/api/jobs?per_page=20")
                        expected = (200,)
                    else:
                        status, body = _call(conn, "GET", f"/api/jobs/{running}/samples")
                        expected = (200,)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    bad.append(repr(exc))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
                    continue
                n += 1
                if status not in expected:
                    bad.append(f"{status} {body}")
            conn.close()
            with lock:
                submitted.extend(mine)
                problems.extend(bad)
                counts["requests"] += n

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert not problems, problems[:10]
        assert counts["requests"] > 200 and len(submitted) > 10
        status, body = live.request("GET", "/api/jobs?per_page=1")
        assert status == 200 and body["data"]["total"] == len(submitted) + 1
        db = sqlite3.connect(with_tiny / "lbs.sqlite3")
        stored = {r[0] for r in db.execute("SELECT id FROM jobs")}
        assert stored == {running, *submitted}

        job = live.wait_for(running, ("succeeded", "failed"), timeout=240)
        assert job["state"] == "succeeded", job["error"]
        idx = [r[0] for r in db.execute("SELECT idx FROM samples WHERE job_id = ? ORDER BY idx",
                                        (running,))]
        assert idx == list(range(12))
        for job_id in submitted:  # leave nothing running behind
            live.request("POST", f"/api/jobs/{job_id}/cancel")
        assert "Traceback" not in live.log()
    finally:
        live.stop()
