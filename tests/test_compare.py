"""Comparison jobs (`params.methods`): basic and optimized inference on the same NIAH
prompts, one after the other in one worker, through the real server, worker, SQLite
file and command line."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

METHODS = ["basic", "optimized"]
GRID = {"context_lengths": [256, 512], "depth_percents": [0, 50, 100], "max_new_tokens": 8,
        "methods": METHODS, "batch_size": 1}  # a sample's timing is then its own
N = 6  # prompts in GRID

# What the memory tracker writes after a release (backend.engine.memory.tracker.release_check).
RELEASE_CHECK = re.compile(r"RSS (returned [\d.]+ MB|did not drop \([+-][\d.]+ MB) "
                           r"of ([\d.]+) MB expected")


def check_events(events: list[dict]) -> None:
    """One load and one release per method, the first released before the second loads,
    each release checked by the memory tracker against the size of what was loaded."""
    assert [e["kind"] for e in events] == ["load", "release", "load", "release"], events
    assert {e["model"] for e in events} == {"builtin:tiny"}
    size = events[0]["bytes"]
    assert size > 0 and all(e["bytes"] == size for e in events)  # the same weights twice
    for release in events[1::2]:
        found = RELEASE_CHECK.search(release.get("note", ""))
        assert found, release
        assert float(found.group(2)) == round(size / 2**20, 1)


def check_samples(samples: list[dict]) -> None:
    """Pass k holds item i as sample k * N + i; each item answered once per method."""
    assert [s["idx"] for s in samples] == list(range(2 * N))
    for s in samples:
        assert s["fields"]["method"] == METHODS[s["idx"] // N]
        assert s["fields"]["item"] == s["idx"] % N
        timing = s["fields"]["timing"]  # batch of 1: computed plus reused (a shared prefix)
        assert timing["prefill_tokens"] + timing.get("shared_prefix_tokens", 0) \
            == s["prompt_tokens"]
    first, second = samples[:N], samples[N:]
    # The same prompts for both methods, so the comparison is like for like.
    assert [s["prompt"] for s in first] == [s["prompt"] for s in second]


def check_scores(scores: dict, samples: list[dict]) -> None:
    rows = {m["method"]: m for m in scores["methods"]}
    assert list(rows) == METHODS
    for method, row in rows.items():
        mine = [s for s in samples if s["fields"]["method"] == method]
        assert row["count"] == N
        assert row["score"] == pytest.approx(sum(s["score"] for s in mine) / N)
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["latency_s_mean"] == pytest.approx(
            sum(s["latency_s"] for s in mine) / N, abs=1e-5)
        assert row["peak_rss_mb"] > 10
        assert row["peak_gpu_mb"] is None or row["peak_gpu_mb"] > 0
    # The dataset's own scores are those of the first method.
    assert scores["count"] == N and len(scores["cells"]) == N
    # Agreement is the share of items answered alike, here computed from the samples.
    pairs = zip(samples[:N], samples[N:], strict=True)
    same = sum(a["prediction"] == b["prediction"] for a, b in pairs)
    assert scores["agreement"] == pytest.approx(same / N)
    # Eager and SDPA attention compute the same function; in float32 greedy decoding of
    # the tiny model they pick the same tokens, so every answer agrees.
    assert scores["agreement"] == 1.0


def test_comparison_job_over_http(live_server):
    status, body = live_server.request("POST", "/api/jobs", {
        "model": "builtin:tiny", "dataset": "needle_in_haystack", "params": GRID})
    assert status == 201, body
    job_id = body["data"]["job"]["id"]

    job = live_server.wait_for(job_id, ("succeeded", "failed", "cancelled"))
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"] == {"done": 2 * N, "total": 2 * N}
    samples = live_server.request("GET", f"/api/jobs/{job_id}/samples")[1]["data"]["samples"]
    check_samples(samples)
    check_scores(job["scores"], samples)
    check_events(job["events"])
    memory = job["memory"]
    assert memory["rss_at_load_optimized_bytes"] > 10 * 2**20  # read after the second load
    assert memory["rss_peak_bytes"] >= memory["rss_at_load_optimized_bytes"]

    db = sqlite3.connect(Path(live_server.data_dir) / "lbs.sqlite3")
    try:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT idx) FROM samples WHERE job_id=?",
                          (job_id,)).fetchone() == (2 * N, 2 * N)
        stored = {(json.loads(f)["method"], json.loads(f)["item"]) for (f,) in db.execute(
            "SELECT fields FROM samples WHERE job_id=?", (job_id,))}
        assert stored == {(m, i) for m in METHODS for i in range(N)}
        names = {r[0] for r in db.execute("SELECT name FROM scores WHERE job_id=?", (job_id,))}
        assert names == {"overall", "cell", "method", "agreement"}
    finally:
        db.close()


@pytest.mark.parametrize(("model", "methods", "field", "says"), [
    ("builtin:tiny", ["basic", "basic"], "params.methods", "at most once"),
    ("builtin:tiny", ["fast"], "params.methods[0]", "'basic' or 'optimized'"),
    ("builtin:tiny", [], "params.methods", "at least 1"),
    ("openai:gpt-4o", METHODS, "params.methods", "not openai: models"),
])
def test_bad_methods_refused_at_submit(with_tiny, monkeypatch, model, methods, field, says):
    monkeypatch.setenv("LBS_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # never contacted
    from backend.common.config import load_settings
    from backend.server import create_app

    client = create_app(load_settings(), {"TESTING": True}).test_client()
    res = client.post("/api/jobs", json={"model": model, "dataset": "needle_in_haystack",
                                         "params": {**GRID, "methods": methods}})
    assert res.status_code == 422, res.get_json()
    error = res.get_json()["error"]
    assert error["code"] == "invalid_params"
    assert [d["field"] for d in error["details"]] == [field]
    assert says in error["message"]
    assert client.get("/api/jobs").get_json()["data"]["total"] == 0


def test_comparison_from_the_command_line(with_tiny, tmp_path):
    out = tmp_path / "result.json"
    params = [arg for key, value in GRID.items()
              for arg in ("--param", f"{key}={json.dumps(value)}")]
    proc = subprocess.run([sys.executable, "-m", "backend.apps.cli", "eval", "--model",
                           "builtin:tiny", "--dataset", "needle_in_haystack", *params,
                           "--output", str(out), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "methods:" in proc.stdout and "prefill_tokens_per_s" in proc.stdout
    result = json.loads(out.read_text())
    check_samples(result["samples"])
    check_scores(result["scores"], result["samples"])
    check_events(result["events"])

    proc = subprocess.run([sys.executable, "-m", "backend.apps.cli", "eval", "--model",
                           "builtin:tiny", "--dataset", "needle_in_haystack", "--param",
                           'methods=["optimized","optimized"]'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "params.methods" in proc.stderr and "Traceback" not in proc.stderr
