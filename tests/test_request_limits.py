"""Bounds on what one request or one submitter can ask for: timeouts too small to mean
anything are refused, numbers in query strings are plain numbers, and one submitter
can keep at most LBS_MAX_QUEUED_PER_SUBMITTER jobs waiting (a data-parallel job's
shards counted), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from tests.conftest import ENGINES

NIAH = {"context_lengths": [256], "depth_percents": [0], "max_new_tokens": 4}


def _job(**extra) -> dict:
    return {"model": "builtin:tiny", "dataset": "needle_in_haystack", "params": NIAH, **extra}


def _fields(res) -> list[str]:
    return [d["field"] for d in res.get_json()["error"]["details"]]


def test_timeouts_and_limits_that_mean_nothing_are_refused(client):
    for tiny in (1e-300, 0.001, 0.5):
        res = client.post("/api/gpu/timeout", json={"timeout": tiny})
        assert res.status_code == 422 and _fields(res) == ["timeout"], (tiny, res.get_json())
        res = client.post("/api/jobs", json=_job(timeout_s=tiny))
        assert res.status_code == 422 and _fields(res) == ["timeout_s"], tiny
    assert client.post("/api/jobs", json=_job(timeout_s=1.0)).status_code == 201
    for odd in ("1_000", "1_0.5", " 2", "0x10", "nan", "inf", "1e400"):
        res = client.post(f"/api/v1/memory/limit?limit_gb={odd}")
        assert res.status_code == 422 and _fields(res) == ["limit_gb"], (odd, res.get_json())
        res = client.get(f"/api/jobs?page={odd}")
        assert res.status_code == 422 and _fields(res) == ["page"], (odd, res.get_json())


@pytest.mark.parametrize("db_url", ENGINES, indirect=True)
def test_one_submitter_queues_at_most_its_cap(monkeypatch, data_dir, with_tiny, db_url):
    from backend.common.config import load_settings
    from backend.server import create_app

    monkeypatch.setenv("LBS_MAX_QUEUED_PER_SUBMITTER", "5")
    client = create_app(load_settings(), {"TESTING": True}).test_client()
    assert client.post("/api/jobs", json=_job(submitter="ann", data_parallel=2)).status_code \
        == 201  # 2 shards
    assert client.post("/api/jobs", json={"jobs": [_job(submitter="ann")] * 3}).status_code \
        == 201  # 5 queued
    res = client.post("/api/jobs", json=_job(submitter="ann"))
    assert res.status_code == 429, res.get_json()
    error = res.get_json()["error"]
    assert error["code"] == "too_many_queued" and _fields(res) == ["submitter"]
    assert "LBS_MAX_QUEUED_PER_SUBMITTER" in error["message"], error
    # a batch that would pass the cap is refused whole; others are not held back
    res = client.post("/api/jobs", json={"jobs": [_job(submitter="bob")] * 4
                                         + [_job(submitter="bob", data_parallel=2)]})
    assert res.status_code == 429 and "bob" in res.get_json()["error"]["message"]
    assert client.get("/api/jobs?submitter=bob").get_json()["data"]["total"] == 0
    assert client.post("/api/jobs", json=_job(submitter="bob")).status_code == 201
    # a cancelled job no longer counts
    queued = client.get("/api/jobs?submitter=ann&state=queued").get_json()["data"]["jobs"]
    assert client.post(f"/api/jobs/{queued[0]['id']}/cancel").status_code == 200
    assert client.post("/api/jobs", json=_job(submitter="ann")).status_code == 201
