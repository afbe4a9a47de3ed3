"""Scheduling: priorities, round robin over submitters, labels, GPU counts, memory
admission, the reasons a job waits, lost workers, and waking idle workers."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from backend.queue import jobs
from backend.queue.db import WorkerRow, utcnow
from backend.queue.scheduling import Capacity
from tests.conftest import ENGINES, queue_on

both_engines = pytest.mark.parametrize("db_url", ENGINES, indirect=True)
NIAH = "needle_in_haystack"


def _submit(factory, n=1, **fields) -> list[int]:
    new = [jobs.NewJob("builtin:tiny", NIAH, {}, **fields) for _ in range(n)]
    return [j.id for j in queue_on(factory).submit(new)]


def _claim(factory, worker="w", caps=None):
    job = queue_on(factory).claim(worker, capacity=caps)
    return None if job is None else job.id


def _drain(factory, caps=None) -> list[int]:
    order = []
    while (job_id := _claim(factory, caps=caps)) is not None:
        order.append(job_id)
    return order


@both_engines
def test_higher_priority_first_then_oldest(factory):
    low = _submit(factory, 2)
    high = _submit(factory, 2, priority=5)
    urgent = _submit(factory, 1, priority=9)
    assert _drain(factory) == urgent + high + low


@both_engines
def test_round_robin_over_submitters(factory):
    """One user's 20 jobs do not starve another's 2 submitted later."""
    alice = _submit(factory, 20, submitter="alice")
    assert _claim(factory) == alice[0]  # alice's work already started
    bob = _submit(factory, 2, submitter="bob")
    order = _drain(factory)
    assert order[:4] == [bob[0], alice[1], bob[1], alice[2]]
    assert sorted(order) == sorted(alice[1:] + bob)
    # priority still beats fairness
    more = _submit(factory, 2, submitter="alice", priority=1)
    _submit(factory, 1, submitter="carol")
    assert _claim(factory) == more[0] and _claim(factory) == more[1]


@both_engines
def test_labels_pin_jobs_to_workers(factory):
    pinned = _submit(factory, 1, worker_label="a100-box")
    free = _submit(factory, 1)
    assert _claim(factory, caps=Capacity(labels=("laptop",))) == free[0]
    assert _claim(factory, caps=Capacity(labels=("laptop",))) is None
    assert _claim(factory, caps=Capacity(labels=("laptop", "a100-box"))) == pinned[0]


@both_engines
def test_num_gpus_and_memory_admission(factory):
    GB = 1024**3
    (two,) = _submit(factory, 1, num_gpus=2)
    (big,) = _submit(factory, 1, memory_bytes=30 * GB)
    (small,) = _submit(factory, 1, memory_bytes=2 * GB)
    one_gpu_16g = Capacity(gpu_count=1, free_gpu_bytes=(16 * GB,))
    assert _drain(factory, one_gpu_16g) == [small]
    # a CPU worker runs one-device jobs on the CPU, whatever their memory estimate
    assert _claim(factory, caps=Capacity()) == big
    assert _claim(factory, caps=Capacity()) is None
    assert _claim(factory, caps=Capacity(gpu_count=2, free_gpu_bytes=(2 * GB, GB))) == two


def _worker_row(factory, worker_id, *, labels=(), gpus=(), free=None, age_s=0.0):
    gpu_rows = [{"index": i, "name": "simulated GPU", "total_bytes": size,
                 "free_bytes": size, "simulated": True} for i, size in enumerate(gpus)]
    queue_on(factory).workers.register(worker_id, "host-a", 1234, "cpu", labels=labels,
                                       gpus=gpu_rows, gpu_free_bytes=free)
    if age_s:
        with factory.begin() as s:
            s.execute(sa.update(WorkerRow).where(WorkerRow.id == worker_id)
                      .values(heartbeat_at=utcnow() - timedelta(seconds=age_s)))


def _reason(factory, job_id):
    return queue_on(factory).waiting_reasons([queue_on(factory).get(job_id)])[job_id]


def test_waiting_reasons(factory):
    GB = 1024**3
    (job_id,) = _submit(factory, 1, memory_bytes=20 * GB, num_gpus=2, worker_label="big")
    assert "no live worker" in _reason(factory, job_id)
    _worker_row(factory, "w1", labels=["small"], gpus=[8 * GB], free=8 * GB)
    assert "pinned to worker label 'big'" in _reason(factory, job_id)
    _worker_row(factory, "w2", labels=["big"], gpus=[8 * GB], free=8 * GB)
    assert "needs 2 GPUs" in _reason(factory, job_id)
    _worker_row(factory, "w3", labels=["big"], gpus=[8 * GB, 8 * GB], free=16 * GB)
    reason = _reason(factory, job_id)
    assert "needs about 20.0 GiB of GPU memory" in reason and "16.0 GiB" in reason
    _worker_row(factory, "w4", labels=["big"], gpus=[24 * GB, 24 * GB], free=48 * GB,
                age_s=600)  # would fit, but it stopped heartbeating
    assert "needs about 20.0 GiB" in _reason(factory, job_id)
    _worker_row(factory, "w5", labels=["big"], gpus=[24 * GB, 24 * GB], free=48 * GB)
    assert _reason(factory, job_id).startswith("next in line")  # nothing before it


@both_engines
def test_lost_workers_are_marked_and_shown(factory, client):
    _worker_row(factory, "alive")
    _worker_row(factory, "gone", age_s=120)
    rows = {w["id"]: w for w in client.get("/api/workers").get_json()["data"]["workers"]}
    assert (rows["alive"]["state"], rows["alive"]["alive"]) == ("idle", True)
    assert (rows["gone"]["state"], rows["gone"]["alive"]) == ("lost", False)
    assert rows["gone"]["heartbeat_age_s"] >= 120
    assert queue_on(factory).workers.mark_lost() == ["gone"]
    queue_on(factory).workers.heartbeat("gone")  # it comes back
    assert {w.id: w.state for w in queue_on(factory).workers.all()}["gone"] == "idle"


def test_api_fields_validation_and_waiting_reason(client, monkeypatch, settings):
    body = {"model": "builtin:tiny", "dataset": NIAH,
            "params": {"context_lengths": [4096], "depth_percents": [50]},
            "priority": 3, "submitter": "alice", "worker_label": "gpu-box", "num_gpus": 2}
    res = client.post("/api/jobs", json=body)
    assert res.status_code == 201, res.get_json()
    job = res.get_json()["data"]["job"]
    assert (job["priority"], job["submitter"], job["worker_label"], job["num_gpus"]) == \
        (3, "alice", "gpu-box", 2)
    assert job["memory_estimate_bytes"] > 1_000_000  # weights plus KV cache at 4096+48 tokens
    assert "no live worker" in job["waiting_reason"]
    listed = client.get("/api/jobs?submitter=alice").get_json()["data"]
    assert listed["total"] == 1 and listed["jobs"][0]["waiting_reason"]
    assert client.get("/api/jobs?submitter=bob").get_json()["data"]["total"] == 0
    for field, value in [("priority", 5000), ("num_gpus", 0), ("submitter", ""),
                         ("worker_label", "no spaces please"), ("submitter", "x" * 200)]:
        res = client.post("/api/jobs", json={**body, field: value})
        assert res.status_code == 422, (field, value)
        assert res.get_json()["error"]["details"][0]["field"] == field
    plain = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": NIAH})
    assert plain.get_json()["data"]["job"]["submitter"] == "anonymous"
    assert plain.get_json()["data"]["job"]["num_gpus"] == 1


def test_memory_estimate_grows_with_context(settings, with_tiny):
    from backend.engine.preparation import prepare
    from backend.runners.hf.account import estimate_job_bytes

    def need(lengths, batch=1):
        p = prepare("builtin:tiny", NIAH, {"context_lengths": lengths, "batch_size": batch},
                    settings)
        return estimate_job_bytes(p.spec, p.dataset, p.params, p.info.max_length, settings)

    short, long = need([512]), need([512, 8000])
    # tiny: 2 layers, 2 KV heads of 16 dims, float32 on CPU: 512 bytes of keys and values
    # per position, in the row's cache and in the shared prefix kept beside it, and the
    # row's boolean mask over its keys while it continues the prefix
    kv = 2 * 2 * 2 * 16 * 4
    assert long - short >= 2 * (8000 - 512) * kv + (7999 * 8000 - 511 * 512)
    # four rows: three more caches of the 8000-token prompt
    assert need([8000], batch=4) - long >= 3 * 8000 * kv


def test_worker_with_simulated_gpus_claims_only_what_fits(factory, monkeypatch, with_tiny,
                                                          client):
    from backend.common.config import load_settings
    from tests.test_jobs import started_worker

    res = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": NIAH, "params": {
        "context_lengths": [8000], "depth_percents": [50], "max_new_tokens": 2}})
    job = res.get_json()["data"]["job"]
    need = job["memory_estimate_bytes"]
    monkeypatch.setenv("LBS_SIMULATED_GPU_MEMORY", str(need // 2))
    with started_worker(load_settings(), "small-gpu") as worker:
        assert worker.capacity() == Capacity(labels=worker.labels, gpu_count=1,
                                             free_gpu_bytes=(need // 2,),
                                             host=socket.gethostname(), gpu_indices=(0,))
        assert not worker.run_once()
        reason = client.get(f"/api/jobs/{job['id']}").get_json()["data"]["job"]
        assert "of GPU memory" in reason["waiting_reason"]
        shown = client.get("/api/workers").get_json()["data"]["workers"][0]
        assert shown["gpu_count"] == 1 and shown["gpus"][0]["simulated"]
    monkeypatch.setenv("LBS_SIMULATED_GPU_MEMORY", f"{need // 20},{need}")
    monkeypatch.setenv("LBS_GPU_MEMORY_LIMIT", "0.9")  # the cap counts: (0.05 + 0.9) x need
    with started_worker(load_settings(), "capped") as worker:
        assert not worker.run_once()
    monkeypatch.setenv("LBS_GPU_MEMORY_LIMIT", "0")
    with started_worker(load_settings(), "two-gpus") as worker:
        assert not worker.run_once()  # a one-GPU job runs on the first: need // 20
    monkeypatch.setenv("LBS_SIMULATED_GPU_MEMORY", f"{need},{need // 20}")
    with started_worker(load_settings(), "roomy-first") as worker:
        assert worker.run_once()
    assert queue_on(factory).get(job["id"]).state == "succeeded"


def test_pool_plan_and_worker_gpus(monkeypatch):
    from backend.apps.worker_gpus import detect_gpus
    from backend.common.config import load_settings
    from backend.server import WorkerPool

    monkeypatch.setenv("LBS_WORKERS", "0,1;2")
    assert WorkerPool(load_settings()).plan() == ["0,1", "2"]
    monkeypatch.setenv("LBS_WORKERS", "auto")
    monkeypatch.setenv("LBS_SIMULATED_GPU_MEMORY", "24GB,16GiB,8GB")
    assert WorkerPool(load_settings()).plan() == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")  # what `--gpus 1,2` sets
    gpus = detect_gpus(load_settings())
    assert [(g["index"], g["total_bytes"]) for g in gpus] == [(1, 16 * 2**30), (2, 8 * 2**30)]


@both_engines
def test_idle_worker_wakes_on_new_work(factory, settings, db_url):
    """A submitted job wakes an idle worker: LISTEN/NOTIFY on PostgreSQL, a 50 ms read of
    the queue on SQLite."""
    from backend.queue.notify import WorkWaiter

    waiter = WorkWaiter(settings.database_url)
    stop = threading.Event()
    try:
        assert waiter.listening == (db_url is not None)
        waiter.mark()
        assert not waiter.wait(0.05, 0.3, stop)  # nothing arrives: times out
        timer = threading.Timer(0.3, _submit, args=(factory,))
        timer.start()
        started = time.monotonic()
        woke = waiter.wait(5.0, 10.0, stop)
        waited = time.monotonic() - started
        timer.join()
        assert woke and 0.25 < waited < 1.5, waited  # not the 5 or 10 s timeouts
    finally:
        waiter.close()


def test_waiting_reason_says_when_nothing_is_ahead(factory):
    """On an empty queue a new job is next, not behind "higher priorities and other
    submitters"; behind others, the reason says how many."""
    _worker_row(factory, "idle")
    (first,) = _submit(factory)
    reason = _reason(factory, first)
    assert reason.startswith("next in line") and "higher priorities" not in reason
    second, third = _submit(factory, 2)
    assert _reason(factory, third).startswith("waiting for its turn: 2 queued jobs before it")
    (urgent,) = _submit(factory, priority=5)
    assert _reason(factory, urgent).startswith("next in line")
    assert _reason(factory, first).startswith("waiting for its turn: 1 queued job before it")
