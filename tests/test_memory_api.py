"""The model manager through HTTP on a real server + worker: /api/v1/memory and /api/gpu."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from tests.conftest import ECHO_PLUGIN, ROOT, LiveServer, manager_status, queue_on, stop_process

pytestmark = pytest.mark.slow

# The built-in tiny model holds about 1.4 MB: this limit fits one of the two models, not both.
LIMIT = "2000000"


def _models(server) -> dict[str, dict]:
    status, body = server.request("GET", "/api/v1/memory/models")
    assert status == 200, body
    return {m["model_name"]: m for m in body["data"]["models"]}


def _run(server, model: str) -> dict:
    status, body = server.request("POST", "/api/jobs", {"model": model, "dataset": "echo"})
    assert status == 201, body
    return server.wait_for(body["data"]["job"]["id"], ("succeeded", "failed", "cancelled"))


def _wait_models(server, predicate, timeout=10.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        models = _models(server)
        if predicate(models) or time.monotonic() > deadline:
            return models
        time.sleep(0.2)


@pytest.fixture
def server(with_tiny, echo_plugin_dir):
    live = LiveServer(with_tiny, {"LBS_PLUGIN_DIRS": str(echo_plugin_dir),
                                  "MAX_MEMORY_USAGE": LIMIT, "LBS_PRESSURE_RATIO": "0.5",
                                  "MEMORY_CHECK_INTERVAL": "3600"}).start()
    yield live
    live.stop()


def test_commands_without_a_worker(with_tiny):
    live = LiveServer(with_tiny, {"LBS_WORKERS": "0"}).start()
    try:
        status, body = live.request("POST", "/api/gpu/offload", {})
        assert status == 503 and body["error"]["code"] == "no_worker"
        stats = live.request("GET", "/api/v1/memory/stats")[1]["data"]
        assert stats["total_models"] == 0 and stats["workers"] == []
    finally:
        live.stop()


def test_cache_eviction_pins_and_commands(server, tiny_copy):
    copy = str(tiny_copy)
    first, second = _run(server, "builtin:tiny"), _run(server, "builtin:tiny")
    assert first["state"] == second["state"] == "succeeded"
    assert [e["kind"] for e in first["events"]] == ["load"]
    assert second["events"] == [], "a cached model is not loaded again"
    models = _wait_models(server, lambda m: m.get("builtin:tiny", {}).get("location") == "cpu"
                          and not m["builtin:tiny"]["in_use"])
    tiny = models["builtin:tiny"]
    assert (tiny["location"], tiny["load_count"], tiny["pinned"]) == ("cpu", 1, False)
    assert tiny["worker_id"] and 1_000_000 < tiny["size_bytes"] < 2_000_000

    # A second model under a limit that fits one: the first is evicted (LRU).
    assert _run(server, copy)["state"] == "succeeded"
    assert set(_wait_models(server, lambda m: "builtin:tiny" not in m)) == {copy}

    # Pinned, it is never evicted: loading the other fails cleanly instead.
    status, body = server.request("POST", "/api/v1/memory/pin", {"model": copy})
    assert status == 200, body
    assert _wait_models(server, lambda m: m[copy]["pinned"])[copy]["pinned"]
    failed = _run(server, "builtin:tiny")
    assert failed["state"] == "failed"
    assert "MemoryLimitError" in failed["error"] and "(pinned)" in failed["error"]
    assert set(_wait_models(server, lambda m: set(m) == {copy})) == {copy}

    # Stats, pressure, system, GPU status in the seed documents' shapes.
    stats = server.request("GET", "/api/v1/memory/stats")[1]["data"]
    assert stats["total_models"] == 1 and stats["memory_limit"] == int(LIMIT)
    for key in ("total_memory_usage", "formatted_usage", "formatted_limit", "memory_pressure",
                "system_available", "formatted_system_available", "system_total",
                "formatted_system_total"):
        assert key in stats, key
    pressure = server.request("GET", "/api/v1/memory/pressure")[1]["data"]
    assert pressure["memory_pressure"] is True  # 1.4 MB of a 2 MB limit is over 50%
    assert pressure["recommended_unload"] == []  # the only model is pinned
    system = server.request("GET", "/api/v1/memory/system")[1]["data"]
    assert system["memory"]["total"] > 0 and "swap" in system

    status, body = server.request("POST", "/api/gpu/timeout", {"timeout": 300})
    assert status == 200 and body["data"]["idle_timeout_seconds"] == 300
    gpu = server.request("GET", "/api/gpu/status")[1]["data"]
    deadline = time.monotonic() + 5
    while gpu[copy]["idle_timeout_seconds"] != 300 and time.monotonic() < deadline:
        time.sleep(0.2)
        gpu = server.request("GET", "/api/gpu/status")[1]["data"]
    entry = gpu[copy]
    assert (entry["location"], entry["idle_timeout_seconds"], entry["monitor_running"]) == \
        ("CPU", 300, True)
    assert entry["gpu_memory"] == {}  # no GPU on this worker
    status, body = server.request("POST", "/api/gpu/offload", {})
    assert status == 200 and "no GPU" in body["data"]["workers"][0]["result"]["message"]

    # Release answers after the worker released it, with what RSS returned.
    server.request("POST", "/api/v1/memory/unpin", {"model": copy})
    status, body = server.request("POST", "/api/gpu/release", {"model": copy})
    assert status == 200, body
    assert [e["model"] for e in body["data"]["released"]] == [copy]
    assert "freed_rss_mb" in body["data"]
    assert _models(server) == {}


def test_bad_memory_requests(server):
    server.wait_for_worker()
    for method, path, body, status, field in [
        ("POST", "/api/v1/memory/limit?limit_gb=-1", None, 422, "limit_gb"),
        ("POST", "/api/v1/memory/limit?limit_gb=lots", None, 422, "limit_gb"),
        ("POST", "/api/v1/memory/limit", None, 422, "limit_gb"),
        ("POST", "/api/gpu/timeout", {"timeout": -5}, 422, "timeout"),
        ("POST", "/api/gpu/timeout", {"timeout": "soon"}, 422, "timeout"),
        ("POST", "/api/gpu/release", {"model": "no-such-model"}, 404, "model"),
        ("POST", "/api/v1/memory/pin", {"model": "no-such-model"}, 404, "model"),
        ("POST", "/api/v1/memory/pin", {}, 422, "model"),
        ("POST", "/api/gpu/offload", {"colour": "red"}, 422, "colour"),
    ]:
        got, answer = server.request(method, path, body)
        assert got == status, (path, body, answer)
        assert answer["status"] == "error"
        assert field in [d["field"] for d in answer["error"]["details"]], answer
    status, body = server.request("POST", "/api/v1/memory/limit?limit_gb=4.0")
    assert status == 200 and body["data"]["memory_limit"] == 4 * 1024**3


def test_idle_model_is_released(with_tiny, echo_plugin_dir):
    live = LiveServer(with_tiny, {"LBS_PLUGIN_DIRS": str(echo_plugin_dir),
                                  "LBS_RELEASE_TIMEOUT": "1.5"}).start()
    try:
        assert _run(live, "builtin:tiny")["state"] == "succeeded"
        # the worker's log says when the idle monitor released it
        deadline = time.monotonic() + 15
        while "released builtin:tiny" not in live.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        models = _wait_models(live, lambda m: m == {}, timeout=5)
        assert models == {}
        events = live.request("GET", "/api/jobs/1")[1]["data"]["job"]["events"]
        assert [e["kind"] for e in events] == ["load"]
        assert "idle" in live.log() and "released builtin:tiny" in live.log()
    finally:
        live.stop()


# A worker whose control thread never runs: it neither publishes its status once a second
# nor applies commands, so what the API shows comes from the job thread alone.
QUIET_WORKER = ("import sys; from backend.apps import worker, worker_commands; "
                "worker_commands.ManagerChannel.serve = lambda self, stopping: None; "
                "sys.exit(worker.main())")
UNCACHED_PLUGIN = ECHO_PLUGIN.replace('name = "echo"', 'name = "echo_uncached"') \
    .replace("CacheMode.CACHED", "CacheMode.UNCACHED")


def _utc(stamp: str) -> datetime:
    when = datetime.fromisoformat(stamp)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def test_a_finished_job_shows_the_model_where_it_now_is(with_tiny, echo_plugin_dir):
    """Whoever sees `succeeded` reads the model where the job left it: a cached dataset's
    model idle in RAM, an uncached one's released; even from a worker whose control
    thread (the periodic publisher) is stopped."""
    (echo_plugin_dir / "echo_uncached.py").write_text(UNCACHED_PLUGIN)
    live = LiveServer(with_tiny, {"LBS_PLUGIN_DIRS": str(echo_plugin_dir),
                                  "LBS_WORKERS": "0"}).start()
    with open(with_tiny / "worker.log", "ab") as log:
        worker = subprocess.Popen([sys.executable, "-c", QUIET_WORKER], cwd=ROOT,
                                  env=live.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        live.wait_for_worker()
        job = _run(live, "builtin:tiny")
        models = _models(live)  # read right after `succeeded`, without waiting
        assert job["state"] == "succeeded", job
        assert set(models) == {"builtin:tiny"}, models
        tiny = models["builtin:tiny"]
        assert (tiny["location"], tiny["in_use"], tiny["load_count"], tiny["stale"]) == \
            ("cpu", False, 1, False)
        # the status describes a moment after the job started and before it was finished
        assert _utc(job["started_at"]) <= _utc(tiny["as_of"]) <= _utc(job["finished_at"])
        gpu = live.request("GET", "/api/gpu/status")[1]["data"]["builtin:tiny"]
        assert (gpu["location"], gpu["as_of"], gpu["stale"]) == ("CPU", tiny["as_of"], False)
        stats = live.request("GET", "/api/v1/memory/stats")[1]["data"]
        assert stats["total_models"] == 1 and stats["as_of"] == tiny["as_of"]
        assert [(w["as_of"], w["stale"]) for w in stats["workers"]] == [(tiny["as_of"], False)]

        # an uncached dataset (like NIAH) releases the model after its job
        job = live.request("POST", "/api/jobs", {"model": "builtin:tiny",
                                                 "dataset": "echo_uncached"})[1]
        job = live.wait_for(job["data"]["job"]["id"], ("succeeded", "failed", "cancelled"))
        assert job["state"] == "succeeded", job
        assert _models(live) == {}
        assert [e["kind"] for e in job["events"]] == ["release"]
    finally:
        stop_process(worker)
        live.stop()


def test_worker_publishes_after_a_move_between_jobs(monkeypatch, with_tiny, echo_plugin_dir):
    """A model moved outside a job (idle monitor, eviction) is published at once, not at
    the next periodic publication: here there is none."""
    from backend.apps.worker import Worker
    from backend.common.config import load_settings
    from backend.queue import jobs

    monkeypatch.setenv("LBS_PLUGIN_DIRS", str(echo_plugin_dir))
    settings = load_settings()
    worker = Worker(settings, worker_id="w")
    worker.channel.status_interval = 3600.0
    worker.start()

    def published_models(predicate) -> list[dict]:
        deadline = time.monotonic() + 10
        while True:
            (published,) = worker.queue.commands.statuses()
            if predicate(published.status["models"]) or time.monotonic() > deadline:
                return published.status["models"]
            time.sleep(0.05)

    try:
        worker.queue.submit([jobs.NewJob("builtin:tiny", "echo", {})])
        assert worker.run_once()
        models = published_models(lambda models: True)  # published before the job ended
        assert [(m["model_name"], m["location"]) for m in models] == [("builtin:tiny", "cpu")]
        worker.manager.release("builtin:tiny")  # as the idle monitor would, from a thread
        assert published_models(lambda models: models == []) == []
    finally:
        worker.stop()
        worker.manager.stop_monitor()


def test_statuses_say_when_they_were_taken_and_whether_stale(client, factory, settings):
    """A worker whose heartbeat stopped still shows what it last published, marked stale,
    and is left out of the totals; commands only go to live workers."""
    from datetime import timedelta

    import sqlalchemy as sa

    from backend.queue.db import WorkerRow, utcnow

    now = time.time()
    for worker_id, as_of in (("gone", now - 600), ("live", now - 1)):  # "gone" started first
        queue_on(factory).workers.register(worker_id, "host", 1, "cpu")
        queue_on(factory).commands.publish_status(worker_id, manager_status("m", as_of))
    with factory.begin() as session:
        session.execute(sa.update(WorkerRow).where(WorkerRow.id == "gone")
                        .values(heartbeat_at=utcnow() - timedelta(minutes=10)))
    gone_at = datetime.fromtimestamp(now - 600, timezone.utc).isoformat()
    live_at = datetime.fromtimestamp(now - 1, timezone.utc).isoformat()

    models = client.get("/api/v1/memory/models").get_json()["data"]["models"]
    assert [(m["worker_id"], m["as_of"], m["stale"]) for m in models] == \
        [("gone", gone_at, True), ("live", live_at, False)]
    stats = client.get("/api/v1/memory/stats").get_json()["data"]
    assert (stats["total_models"], stats["total_memory_usage"], stats["as_of"]) == \
        (1, 1000, live_at)
    assert [(w["worker_id"], w["as_of"], w["stale"]) for w in stats["workers"]] == \
        [("gone", gone_at, True), ("live", live_at, False)]
    gpu = client.get("/api/gpu/status").get_json()["data"]
    assert {key: (e["worker_id"], e["as_of"], e["stale"]) for key, e in gpu.items()} == \
        {"m": ("live", live_at, False), "m (gone)": ("gone", gone_at, True)}
    answer = client.post("/api/gpu/offload", json={"worker": "gone"})
    assert answer.status_code == 503 and answer.get_json()["error"]["code"] == "no_worker"


def test_stats_name_the_idle_timeout_in_force(client, factory, settings):
    """The page's idle-timeout box shows the value in force with no model loaded: a live
    worker's, else the operator's stored one, else the configured GPU_IDLE_TIMEOUT."""

    def in_force():
        return client.get("/api/v1/memory/stats").get_json()["data"]["idle_timeout_seconds"]

    assert in_force() == settings.gpu_idle_timeout == 600
    assert client.post("/api/gpu/timeout", json={"timeout": 120}).status_code == 202
    assert in_force() == 120
    queue_on(factory).workers.register("live", "host", 1, "cpu")
    status = {**manager_status("m", time.time()), "idle_timeout_seconds": 300.0}
    status["models"] = []  # no model loaded
    queue_on(factory).commands.publish_status("live", status)
    assert in_force() == 300
