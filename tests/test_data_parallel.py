"""One job over several workers (`data_parallel`): its shards are claimed, leased,
resumed and cancelled like jobs; every sample is stored once, on the job; the job's
scores are those of a single-worker run (aggregated over all samples); each shard's
memory peaks are kept. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from backend.apps.worker import Worker
from backend.queue import jobs
from backend.queue.db import Job, JobState, utcnow, write_session
from tests.conftest import ENGINES, LiveServer, queue_on

NIAH = "needle_in_haystack"
GRID = {"context_lengths": [256, 384], "depth_percents": [0, 25, 50, 75, 100],
        "max_new_tokens": 6}


def _submit(factory, shards: int, params=GRID) -> int:
    (job,) = queue_on(factory).submit([jobs.NewJob("builtin:tiny", NIAH, params,
                                                   data_parallel=shards)])
    return job.id


def _drain(settings, names: list[str]) -> list[Worker]:
    """Workers taking turns at the queue until it is empty."""
    workers = [Worker(settings, worker_id=n) for n in names]
    for w in workers:
        w.start()
    try:
        while any([w.run_once() for w in workers]):
            pass
    finally:
        for w in workers:
            w.stop()
            w.manager.stop_monitor()
    return workers


def _shards(factory, job_id):
    with factory() as session:
        return session.scalars(sa.select(Job).where(Job.parent_id == job_id)
                               .order_by(Job.shard_index)).all()


def _scores(job):
    return [(s.name, s.value, s.count, s.labels) for s in job.scores]


@pytest.mark.parametrize("db_url", ENGINES, indirect=True)
def test_shards_store_each_sample_once_and_score_like_one_worker(settings, factory,
                                                                 with_tiny, db_url):
    single = _submit(factory, 1)
    _drain(settings, ["solo"])
    sharded = _submit(factory, 3)
    _drain(settings, ["w1", "w2", "w3"])

    one, many = queue_on(factory).get(single), queue_on(factory).get(sharded)
    assert many.state == JobState.SUCCEEDED.value, many.error
    assert many.shard_count == 3 and many.progress_done == many.progress_total == 10
    samples, total = queue_on(factory).samples(sharded)
    assert [s.idx for s in samples] == list(range(10)) and total == 10  # each once
    ref, _ = queue_on(factory).samples(single)
    assert [s.prediction for s in samples] == [s.prediction for s in ref]
    assert _scores(many) == _scores(one)
    shards = _shards(factory, sharded)
    assert [s.state for s in shards] == [JobState.SUCCEEDED.value] * 3
    assert {s.worker_id for s in shards} == {"w1", "w2", "w3"}  # one shard each
    assert [s.progress_done for s in shards] == [4, 3, 3]  # idx % 3
    peaks = {p.name for p in many.memory_peaks}
    assert {"shard0_rss_peak", "shard1_rss_peak", "shard2_rss_peak", "rss_peak"} <= peaks
    # the list shows the job, not its shards
    listed, count = queue_on(factory).list()
    assert sorted(j.id for j in listed) == [single, sharded] and count == 2


@pytest.mark.parametrize("db_url", ENGINES, indirect=True)
def test_a_shard_whose_worker_died_resumes_elsewhere(settings, factory, with_tiny, db_url):
    job_id = _submit(factory, 2)
    dead = queue_on(factory, settings.lease_seconds, settings.max_attempts).claim("dead")
    assert dead.parent_id == job_id and dead.shard_index == 0
    assert queue_on(factory).get(job_id).state == JobState.RUNNING.value
    for idx in (0, 2):  # two samples of shard 0 were stored before the worker died
        queue_on(factory).record_sample(dead.id, "dead", {
            "idx": idx, "prompt": "p", "prompt_tokens": 1, "prediction": "stored before",
            "score": 0.0, "latency_s": 0.1, "output_tokens": 1, "fields": {
                "context_length": 256, "depth_percent": 0.0 if idx == 0 else 50.0}})
    with write_session(factory) as session:  # its lease ran out
        session.get(Job, dead.id).lease_expires_at = utcnow() - timedelta(seconds=1)
    _drain(settings, ["w1", "w2"])

    job = queue_on(factory).get(job_id)
    assert job.state == JobState.SUCCEEDED.value, job.error
    samples, _ = queue_on(factory).samples(job_id)
    assert [s.idx for s in samples] == list(range(10))
    assert [s.prediction for s in samples if s.idx in (0, 2)] == ["stored before"] * 2
    shard0 = _shards(factory, job_id)[0]
    assert shard0.attempts == 2 and shard0.state == JobState.SUCCEEDED.value
    assert any(e["kind"] == "lease_expired" for e in shard0.events)


@pytest.mark.parametrize("db_url", ENGINES, indirect=True)
def test_cancel_stops_every_shard(settings, factory, with_tiny, db_url):
    job_id = _submit(factory, 3)
    running = queue_on(factory, settings.lease_seconds, settings.max_attempts).claim("w1")
    queue_on(factory).cancel(job_id)
    shards = _shards(factory, job_id)
    assert [s.state for s in shards] == [JobState.RUNNING.value, JobState.CANCELLED.value,
                                         JobState.CANCELLED.value]
    assert queue_on(factory).get(job_id).state == JobState.RUNNING.value  # until it stops
    # the running shard hears of it at its next sample or heartbeat, and stops
    assert queue_on(factory).renew(running.id, "w1") is True
    queue_on(factory).finish(running.id, "w1", JobState.CANCELLED)
    job = queue_on(factory).get(job_id)
    assert job.state == JobState.CANCELLED.value and job.finished_at is not None
    assert queue_on(factory, settings.lease_seconds, settings.max_attempts).claim("w2") is None


def test_a_failed_shard_fails_the_job_and_stops_the_others(settings, factory, with_tiny):
    job_id = _submit(factory, 2)
    a = queue_on(factory, settings.lease_seconds, settings.max_attempts).claim("w1")
    b = queue_on(factory, settings.lease_seconds, settings.max_attempts).claim("w2")
    queue_on(factory).finish(a.id, "w1", JobState.FAILED, error="RuntimeError: boom")
    assert queue_on(factory).renew(b.id, "w2") is True  # asked to stop
    queue_on(factory).finish(b.id, "w2", JobState.CANCELLED)
    job = queue_on(factory).get(job_id)
    assert job.state == JobState.FAILED.value and "shard 0: RuntimeError: boom" in job.error


def test_submit_data_parallel_over_the_api(client, factory):
    ok = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": NIAH,
                                        "params": GRID, "data_parallel": 2})
    assert ok.status_code in (200, 201), ok.get_json()
    job = ok.get_json()["data"]["job"]
    assert job["data_parallel"] == 2 and job["state"] == "queued"
    assert len(_shards(factory, job["id"])) == 2
    auto = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": NIAH,
                                          "params": GRID, "data_parallel": "auto"})
    assert auto.get_json()["data"]["job"]["data_parallel"] == 1  # no idle worker here
    for bad in (0, 65, "all", 1.5):
        res = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": NIAH,
                                             "params": GRID, "data_parallel": bad})
        assert res.status_code == 422, bad
        fields = [d["field"] for d in res.get_json()["error"]["details"]]
        assert any("data_parallel" in f for f in fields), fields
    res = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": NIAH,
                                         "params": {**GRID, "methods": ["basic"]},
                                         "data_parallel": 2})
    assert res.status_code == 422
    assert res.get_json()["error"]["details"][0]["field"] == "data_parallel"


@pytest.mark.slow
def test_sigkilled_shard_worker_is_replaced_and_the_shard_resumes(with_tiny):
    long = {"context_lengths": [256, 512, 768, 1024], "depth_percents": {"count": 5},
            "max_new_tokens": 24}
    live = LiveServer(with_tiny, {"LBS_LEASE_SECONDS": "2", "LBS_WORKERS": "2"}).start()
    try:
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": NIAH, "params": long, "data_parallel": 2})
        assert status in (200, 201), body
        job_id = body["data"]["job"]["id"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # both shards running, some samples stored
            shards = [live.request("GET", f"/api/jobs/{job_id + k}")[1]["data"]["job"]
                      for k in (1, 2)]
            done = live.request("GET", f"/api/jobs/{job_id}")[1]["data"]["job"]
            if all(s["worker_id"] for s in shards) and done["progress"]["done"] >= 2:
                break
            time.sleep(0.1)
        victim = shards[0]["worker_id"]
        workers = live.request("GET", "/api/workers")[1]["data"]["workers"]
        os.kill(next(w["pid"] for w in workers if w["id"] == victim), signal.SIGKILL)
        job = live.wait_for(job_id, ("succeeded", "failed", "cancelled"), timeout=300)
        assert job["state"] == "succeeded", job["error"]
        assert job["progress"] == {"done": 20, "total": 20}
        samples = live.request("GET", f"/api/jobs/{job_id}/samples")[1]["data"]["samples"]
        assert [s["idx"] for s in samples] == list(range(20))  # none lost, none twice
        shard = live.request("GET", f"/api/jobs/{shards[0]['id']}")[1]["data"]["job"]
        assert shard["attempts"] == 2
        assert any(e["kind"] == "lease_expired" for e in shard["events"])
    finally:
        live.stop()


def test_a_shard_given_back_after_a_cuda_error_on_its_last_attempt_fails_the_job(
        settings, factory, with_tiny):
    """A shard's worker whose CUDA context broke gives the shard back (Queue.give_back);
    on its last attempt the shard fails, and the job ends with it like after a lost
    lease, instead of staying running with no shard left to finish it."""
    job_id = _submit(factory, 2)
    a = queue_on(factory, settings.lease_seconds, settings.max_attempts).claim("w1")
    b = queue_on(factory, settings.lease_seconds, settings.max_attempts).claim("w2")
    state = queue_on(factory, max_attempts=1).give_back(a.id, "w1", "AcceleratorError: CUDA error")
    assert state == JobState.FAILED
    assert queue_on(factory).renew(b.id, "w2") is True  # the other shard: stop
    queue_on(factory).finish(b.id, "w2", JobState.CANCELLED)
    job = queue_on(factory).get(job_id)
    assert job.state == JobState.FAILED.value and "CUDA error" in job.error


def test_the_job_shows_its_shards(client, factory):
    """GET /api/jobs/<id> of a sharded job lists its shards: worker, state, progress over
    the shard's own items, attempts, memory peaks; lists leave them out."""
    res = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": NIAH,
                                         "params": GRID, "data_parallel": 3})
    job_id = res.get_json()["data"]["job"]["id"]
    a = queue_on(factory).claim("w1")
    queue_on(factory).set_total(a.id, "w1", 10)  # the job's 10 items: shard 0 has 4
    for idx in (0, 3):
        queue_on(factory).record_sample(a.id, "w1", {
            "idx": idx, "prompt": "p", "prompt_tokens": 1, "prediction": "x", "score": 1.0,
            "latency_s": 0.1, "output_tokens": 1, "fields": {}})
    b = queue_on(factory).claim("w2")
    queue_on(factory).finish(b.id, "w2", JobState.SUCCEEDED,
                             memory=[("rss_peak", "cpu", 300 * 2**20),
                                     ("cuda_max_allocated", "cuda:0", 2**30)])

    job = client.get(f"/api/jobs/{job_id}").get_json()["data"]["job"]
    shards = job["shards"]
    assert [s["shard_index"] for s in shards] == [0, 1, 2]
    assert [s["id"] for s in shards] == [a.id, b.id, b.id + 1]
    assert [(s["state"], s["worker_id"], s["attempts"]) for s in shards] == [
        ("running", "w1", 1), ("succeeded", "w2", 1), ("queued", None, 0)]
    assert [s["progress"] for s in shards] == [  # shares of 10 items: 4, 3, 3
        {"done": 2, "total": 4}, {"done": 0, "total": 3}, {"done": 0, "total": 3}]
    assert shards[1]["memory"]["rss_peak_bytes"] == 300 * 2**20
    assert shards[1]["memory"]["gpu"]["cuda:0"]["max_allocated_bytes"] == 2**30
    assert job["progress"]["done"] == 2
    listed = client.get("/api/jobs").get_json()["data"]["jobs"]
    assert "shards" not in listed[0]
    plain = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": NIAH,
                                           "params": GRID}).get_json()["data"]["job"]
    assert client.get(f"/api/jobs/{plain['id']}").get_json()["data"]["job"]["shards"] is None
