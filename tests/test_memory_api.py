"""The model manager through HTTP on a real server + worker: /api/v1/memory and /api/gpu."""

from __future__ import annotations

import time

import pytest

from tests.conftest import LiveServer

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
        models = _models(server)  # workers publish their status about once a second
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
    models = _wait_models(server, lambda m: "builtin:tiny" in m)
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
    assert set(_models(server)) == {copy}

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
        # the worker's log says when the idle monitor released it (status rows lag ~1 s)
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
