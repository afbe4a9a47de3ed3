"""Fuzzing the HTTP API from its own /openapi.json: schemathesis generates valid and
invalid requests for every operation of a real server with a real worker, bounded in
count; no answer may be a 5xx other than the documented 503/504 of the memory
commands, and every error must be the JSON envelope."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from tests.conftest import LiveServer  # noqa: E402

TOKEN = "fuzz-token-0123456789"
EXAMPLES = 20  # per operation and mode: 40 requests per operation, half of them invalid


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, builtin_models_dir):
    data = tmp_path_factory.mktemp("fuzz-data")
    (data / "models").symlink_to(builtin_models_dir, target_is_directory=True)
    zoo = tmp_path_factory.mktemp("fuzz-zoo")
    live = LiveServer(data, {"LBS_API_TOKEN": TOKEN, "LBS_MODEL_DIRS": str(zoo),
                             }).start()
    live.wait_for_worker()
    yield live
    live.stop()


def _operations(live):
    schema = schemathesis.openapi.from_url(
        live.url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    return [result.ok() for result in schema.get_all_operations()]


def test_no_server_errors_from_generated_requests(fuzz_server):
    live = fuzz_server
    operations = _operations(live)
    assert len(operations) >= 20
    failures: list[str] = []
    calls = {"n": 0}

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call(base_url=live.url, timeout=30,
                                     headers={"Authorization": f"Bearer {TOKEN}"})
                calls["n"] += 1
                documented = (response.status_code in (503, 504)
                              and case.path.startswith(("/api/v1/memory", "/api/gpu")))
                if response.status_code >= 500 and not documented:
                    failures.append(f"{case.method} {case.formatted_path} {case.query} "
                                    f"{case.body!r:.200} -> {response.status_code} "
                                    f"{response.text[:200]}")
                if response.status_code >= 400:
                    body = response.json()  # always JSON, never an HTML page or a trace
                    if body.get("status") != "error" or "Traceback" in response.text:
                        failures.append(f"{case.method} {case.formatted_path}: {response.text}")
            try:
                check()
            except Unsatisfiable:  # nothing to get wrong: an operation without inputs
                assert mode is GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures[:20])
    assert calls["n"] > 300
    status, health = live.request("GET", "/healthz")
    assert status == 200 and "Traceback" not in live.log()


def test_every_operation_needs_the_token(fuzz_server):
    import urllib.error
    import urllib.request

    live = fuzz_server
    for operation in _operations(live):
        if operation.path == "/healthz":
            continue
        path = operation.path.replace("{job_id}", "1")
        for auth in (None, "Bearer wrong-token", "Basic " + TOKEN, TOKEN):
            req = urllib.request.Request(live.url + path, method=operation.method.upper(),
                                         data=b"{}" if operation.method == "post" else None,
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": auth} if auth else {})})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            assert err.value.code == 401, (operation.method, path, auth)
