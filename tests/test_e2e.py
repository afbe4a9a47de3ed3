"""End to end: `python -m backend.server` + its worker, a NIAH job over HTTP, results
checked through the API and directly in the SQLite file."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PARAMS = {"context_lengths": [256, 512], "depth_percents": [0, 50, 100], "max_new_tokens": 8}


def test_niah_job_over_http(live_server):
    status, body = live_server.request("POST", "/api/jobs", {
        "model": "builtin:tiny", "dataset": "needle_in_haystack", "params": PARAMS})
    assert status == 201, body
    job_id = body["data"]["job"]["id"]
    assert body["data"]["job"]["state"] == "queued"

    job = live_server.wait_for(job_id, ("succeeded", "failed", "cancelled"))
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"] == {"done": 6, "total": 6}
    assert job["worker_id"] and job["attempts"] == 1 and job["duration_s"] > 0

    scores = job["scores"]
    assert 0.0 <= scores["overall"] <= 1.0 and scores["count"] == 6
    cells = {(c["context_length"], c["depth_percent"]): c for c in scores["cells"]}
    assert set(cells) == {(n, d) for n in (256, 512) for d in (0.0, 50.0, 100.0)}
    assert all(0.0 <= c["score"] <= 1.0 and c["count"] == 1 for c in cells.values())

    memory = job["memory"]
    for name in ("rss_peak", "rss_at_load", "rss_before_load", "rss_after_job"):
        assert memory[f"{name}_bytes"] > 10 * 2**20, name
    assert memory["rss_peak_bytes"] >= memory["rss_at_load_bytes"]
    assert [e["kind"] for e in job["events"]] == ["load", "release"]  # NIAH is uncached

    status, body = live_server.request("GET", f"/api/jobs/{job_id}/samples")
    assert status == 200
    samples = body["data"]["samples"]
    assert [s["idx"] for s in samples] == list(range(6))
    for s in samples:
        assert s["prompt"].startswith("<s><|user|>")  # the chat template is part of the prompt
        assert 0.9 * s["context_length"] <= s["prompt_tokens"] <= s["context_length"]
        assert s["depth_percent"] in (0.0, 50.0, 100.0)
        assert isinstance(s["prediction"], str) and s["latency_s"] > 0
        assert 0.0 <= s["score"] <= 1.0 and s["peak_rss_mb"] > 10

    # The same facts, straight from the SQLite file.
    db = sqlite3.connect(Path(live_server.data_dir) / "lbs.sqlite3")
    try:
        assert db.execute("SELECT state, progress_done FROM jobs WHERE id=?",
                          (job_id,)).fetchone() == ("succeeded", 6)
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT idx) FROM samples WHERE job_id=?",
                          (job_id,)).fetchone() == (6, 6)
        names = {r[0] for r in db.execute("SELECT name FROM scores WHERE job_id=?", (job_id,))}
        assert names == {"overall", "cell"}
        peak = db.execute("SELECT bytes FROM memory_peaks WHERE job_id=? AND name='rss_peak'",
                          (job_id,)).fetchone()[0]
        assert peak == memory["rss_peak_bytes"]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()

    # The server process never loaded torch; the worker did.
    status, body = live_server.request("GET", "/api/workers")
    workers = body["data"]["workers"]
    assert len(workers) == 1 and workers[0]["alive"]
    assert "libtorch" not in Path(f"/proc/{live_server.proc.pid}/maps").read_text()
    assert "libtorch" in Path(f"/proc/{workers[0]['pid']}/maps").read_text()


BAD_REQUESTS = [
    ({"model": "builtin:tiny", "dataset": "no_such_set"}, 422, "unknown_dataset", "dataset"),
    ({"model": "no-such-model", "dataset": "needle_in_haystack"}, 422, "model_not_found",
     "model"),
    ({"model": "/no/such/model", "dataset": "needle_in_haystack"}, 403, "path_refused",
     "model"),
    ({"dataset": "needle_in_haystack"}, 422, "validation_error", "model"),
    ({"model": "builtin:tiny", "dataset": "needle_in_haystack",
      "params": {"context_lengths": "long"}}, 422, "invalid_params", "params.context_lengths"),
    ({"model": "builtin:tiny", "dataset": "needle_in_haystack",
      "params": {"context_lengths": [9000]}}, 422, "invalid_params", "params.context_lengths"),
    ({"jobs": [{"model": "builtin:tiny", "dataset": "needle_in_haystack"},
               {"model": "builtin:tiny", "dataset": "needle_in_haystack",
                "params": {"depth_percents": [-1]}}]},
     422, "invalid_params", "jobs[1].params.depth_percents"),
    ([1, 2, 3], 400, "invalid_body", "body"),
]


def test_bad_requests_get_4xx_json(live_server):
    for body, status, code, field in BAD_REQUESTS:
        got, answer = live_server.request("POST", "/api/jobs", body)
        assert got == status, (body, answer)
        assert answer["status"] == "error"
        assert answer["error"]["code"] == code, answer
        assert field in [d["field"] for d in answer["error"]["details"]], answer
        assert "Traceback" not in str(answer)
    # nothing was queued, not even the valid half of a batch
    assert live_server.request("GET", "/api/jobs")[1]["data"]["total"] == 0
    assert live_server.request("GET", "/api/jobs/12345")[0] == 404
    assert live_server.request("GET", "/api/jobs?state=dancing")[0] == 422


def test_clear_gpu_memory_report_marks_workers(live_server):
    workers = [live_server.wait_for_worker()]
    proc = subprocess.run([sys.executable, "clear_gpu_memory.py", "--json"],
                          cwd=Path(__file__).resolve().parent.parent, env=live_server.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ram"]["total_mb"] > 0
    listed = {w["pid"]: w for w in report["workers"]}
    assert workers[0]["pid"] in listed
    assert listed[workers[0]["pid"]]["id"] == workers[0]["id"]
    assert listed[workers[0]["pid"]]["fresh"]
    assert listed[workers[0]["pid"]]["process"]["rss_mb"] > 50
