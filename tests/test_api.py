"""The REST API through Flask's test client, on a temporary SQLite file."""

from __future__ import annotations

import pytest

from backend.queue.db import JobState
from tests.conftest import queue_on

NIAH = {"model": "builtin:tiny", "dataset": "needle_in_haystack",
        "params": {"context_lengths": [256], "depth_percents": [50]}}


def test_submit_one_and_many(client):
    res = client.post("/api/jobs", json=NIAH)
    assert res.status_code == 201
    job = res.get_json()["data"]["job"]
    assert job["state"] == "queued" and job["progress"] == {"done": 0, "total": None}
    assert job["params"] == NIAH["params"]

    res = client.post("/api/jobs", json={"jobs": [NIAH, NIAH]})
    assert res.status_code == 201
    assert [j["state"] for j in res.get_json()["data"]["jobs"]] == ["queued", "queued"]


def test_list_filter_paginate(client, app):
    factory = app.extensions["lbs"].queue.factory
    ids = [client.post("/api/jobs", json=NIAH).get_json()["data"]["job"]["id"] for _ in range(5)]
    queue_on(factory).cancel(ids[0])
    data = client.get("/api/jobs?per_page=2&page=1").get_json()["data"]
    assert data["total"] == 5 and [j["id"] for j in data["jobs"]] == ids[::-1][:2]
    data = client.get("/api/jobs?per_page=2&page=3").get_json()["data"]
    assert [j["id"] for j in data["jobs"]] == [ids[0]]
    data = client.get("/api/jobs?state=cancelled").get_json()["data"]
    assert [j["id"] for j in data["jobs"]] == [ids[0]]
    assert client.get("/api/jobs?dataset=needle_in_haystack&model=builtin:tiny") \
        .get_json()["data"]["total"] == 5
    assert client.get("/api/jobs?model=other").get_json()["data"]["total"] == 0
    res = client.get("/api/jobs?per_page=0")
    assert res.status_code == 422 and res.get_json()["error"]["details"][0]["field"] == "per_page"


def test_cancel_delete_and_errors(client, app):
    factory = app.extensions["lbs"].queue.factory
    queued = client.post("/api/jobs", json=NIAH).get_json()["data"]["job"]["id"]
    running = client.post("/api/jobs", json=NIAH).get_json()["data"]["job"]["id"]
    queue_on(factory).claim("w")  # takes the oldest: `queued`
    res = client.post(f"/api/jobs/{queued}/cancel")
    assert res.status_code == 200 and res.get_json()["data"]["job"]["cancel_requested"]
    assert client.delete(f"/api/jobs/{queued}").status_code == 409  # still running
    res = client.post(f"/api/jobs/{running}/cancel")
    assert res.get_json()["data"]["job"]["state"] == JobState.CANCELLED.value
    assert client.post(f"/api/jobs/{running}/cancel").status_code == 409
    assert client.delete(f"/api/jobs/{running}").status_code == 200
    for res in (client.get(f"/api/jobs/{running}"), client.delete(f"/api/jobs/{running}"),
                client.get(f"/api/jobs/{running}/samples"), client.post("/api/jobs/77/cancel")):
        assert res.status_code == 404
        assert res.get_json()["error"]["code"] == "not_found"
    # ids beyond a 64-bit integer (found by the fuzzer: SQLite overflowed, a 500) are 404s
    for res in (client.get(f"/api/jobs/{2**64}"), client.delete(f"/api/jobs/{2**63}/"),
                client.get(f"/api/jobs/{10**30}/export"), client.get("/api/jobs/0")):
        assert res.status_code == 404 and res.get_json()["status"] == "error"


def test_bad_bodies(client):
    res = client.post("/api/jobs", data="{not json", content_type="application/json")
    assert res.status_code == 400 and res.get_json()["error"]["code"] == "invalid_body"
    res = client.post("/api/jobs", json={**NIAH, "priority": "high"})
    assert res.status_code == 422
    assert res.get_json()["error"]["details"][0]["field"] == "priority"
    res = client.post("/api/jobs", json={**NIAH, "timeout_s": -1})
    assert res.status_code == 422
    assert res.get_json()["error"]["details"][0]["field"] == "timeout_s"
    res = client.post("/api/jobs", json={**NIAH, "timeout_s": 3600})
    assert res.status_code == 201 and res.get_json()["data"]["job"]["timeout_s"] == 3600
    res = client.post("/api/jobs", json={"jobs": []})
    assert res.status_code == 422 and res.get_json()["error"]["details"][0]["field"] == "jobs"
    res = client.post("/api/jobs", data=b"x" * (3 * 1024 * 1024),
                      content_type="application/json")
    assert res.status_code == 413 and res.get_json()["status"] == "error"
    res = client.put("/api/jobs")
    assert res.status_code == 405 and res.get_json()["status"] == "error"


@pytest.mark.parametrize(("where", "body", "field"), [
    ("params", {"batch_size": "x"}, "params.batch_size"),
    ("params", {"batch_size": 0}, "params.batch_size"),
    ("params", {"batch_size": 999}, "params.batch_size"),
    ("job", {"data_parallel": "many"}, "data_parallel"),
    ("job", {"data_parallel": 0}, "data_parallel"),
])
def test_union_field_errors_name_the_field_plainly(client, where, body, field):
    """A field that takes a number or "auto" is named as the user wrote it (not
    `params.batch_size.constrained-int`), and its message says what it takes."""
    job = {"model": "builtin:tiny", "dataset": "needle_in_haystack",
           "params": {"context_lengths": [256], "depth_percents": [50]}}
    if where == "params":
        job["params"].update(body)
    else:
        job.update(body)
    for path, prefix in (("/api/jobs", ""), ("/api/jobs", "jobs[0].")):
        res = client.post(path, json={"jobs": [job]} if prefix else job)
        assert res.status_code == 422, res.get_json()
        error = res.get_json()["error"]
        fields = [d["field"] for d in error["details"]]
        assert fields == [prefix + field], fields  # one error, not one per union branch
        message = error["details"][0]["message"]
        assert "auto" in message and "constrained" not in message, message
        assert "constrained" not in error["message"] and "literal" not in error["message"]


def test_context_and_grid_ceilings(monkeypatch, data_dir, with_tiny):
    from backend.common.config import load_settings
    from backend.server import create_app

    monkeypatch.setenv("LBS_MAX_CONTEXT_LENGTH", "512")
    monkeypatch.setenv("LBS_MAX_GRID_CELLS", "4")
    client = create_app(load_settings(), {"TESTING": True}).test_client()

    def refused(params: dict, dataset: str = "needle_in_haystack") -> dict:
        res = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": dataset,
                                             "params": params})
        assert res.status_code == 422, res.get_json()
        return res.get_json()["error"]["details"][0]

    assert client.post("/api/jobs", json=NIAH).status_code == 201
    detail = refused({"context_lengths": [256, 1024], "depth_percents": [50]})
    assert detail["field"] == "params.context_lengths"
    assert "1024" in detail["message"] and "LBS_MAX_CONTEXT_LENGTH" in detail["message"]
    detail = refused({"context_lengths": {"min": 128, "max": 512, "count": 3},
                      "depth_percents": {"count": 2}})
    assert detail["field"] == "params.context_lengths" and "6 cells" in detail["message"]
    # the model's own maximum still applies below the ceiling
    monkeypatch.setenv("LBS_MAX_CONTEXT_LENGTH", str(2 * 10**6))
    client = create_app(load_settings(), {"TESTING": True}).test_client()
    detail = refused({"context_lengths": [10**6], "depth_percents": [50]})
    assert detail["field"] == "params.context_lengths"
    assert "beyond the maximum of builtin:tiny" in detail["message"]
    assert client.get("/api/jobs").get_json()["data"]["total"] == 1  # nothing else stored


def test_datasets_and_openapi(client):
    datasets = client.get("/api/datasets").get_json()["data"]["datasets"]
    niah = next(d for d in datasets if d["name"] == "needle_in_haystack")
    assert niah["cache_mode"] == "uncached"
    props = niah["params_schema"]["properties"]
    assert props["max_new_tokens"]["default"] == 48
    assert {"context_lengths", "depth_percents", "needle", "retrieval_question",
            "haystack"} <= set(props)

    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/samples",
            "/api/jobs/{job_id}/cancel", "/api/datasets", "/healthz"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert schemas["JobRequest"]["properties"]["model"]["type"] == "string"
    assert "needle_in_haystack.params" in schemas
    assert {"/api/v1/memory/stats", "/api/v1/memory/limit", "/api/gpu/status",
            "/api/gpu/timeout"} <= set(spec["paths"])
    assert schemas["TimeoutRequest"]["properties"]["timeout"]["minimum"] == 1
    query = {p["name"] for p in spec["paths"]["/api/jobs"]["get"]["parameters"]}
    assert query == {"state", "submitter", "model", "dataset", "page", "per_page"}


def test_openapi_documents_every_route_and_nothing_else(app, client):
    """The document is made from the app's routes: a route missing from it, or a path
    in it that no route serves, fails here. Only the web page's own routes are left
    out, each marked so at its view (openapi.undocumented)."""
    import re

    from backend.apps.api.openapi import left_out

    spec = client.get("/openapi.json").get_json()
    documented = {(path, method.upper()) for path, ops in spec["paths"].items()
                  for method in ops}
    served, page = set(), set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if left_out(app.view_functions[rule.endpoint]):
                page.add(rule.rule)
            else:
                served.add((path, method))
    assert sorted(served - documented) == [], "routes missing from /openapi.json"
    assert sorted(documented - served) == [], "documented paths no route serves"
    assert page == {"/", "/static/<path:name>"}
    models = spec["paths"]["/api/models"]["get"]["responses"]["200"]
    data = models["content"]["application/json"]["schema"]["properties"]["data"]
    assert {"models", "model_dirs"} <= set(data["properties"])


def test_index_page_and_health(client):
    assert client.get("/healthz").get_json() == {"status": "success", "data": {"ok": True}}
    res = client.get("/")
    assert res.status_code == 200 and b"LLM Bench Shower" in res.data


def test_models_list_builtin_and_model_dirs(tmp_path, monkeypatch, with_tiny, builtin_models_dir):
    import shutil

    from backend.common.config import load_settings
    from backend.server import create_app

    shutil.copytree(builtin_models_dir / "builtin-tiny-v1", tmp_path / "zoo" / "org" / "my-model")
    (tmp_path / "zoo" / "notes").mkdir()
    monkeypatch.setenv("LBS_MODEL_DIRS", str(tmp_path / "zoo"))
    client = create_app(load_settings()).test_client()
    models = client.get("/api/models").get_json()["data"]["models"]
    names = {m["name"]: m for m in models}
    assert {"builtin:tiny", "builtin:small"} <= set(names)
    folder = str((tmp_path / "zoo" / "org" / "my-model").resolve())
    assert names[folder]["max_length"] == 8192 and names[folder]["kind"] == "folder"
    assert len(models) == 3


def test_export_json_and_csv(client, app):
    factory = app.extensions["lbs"].queue.factory
    job_id = client.post("/api/jobs", json=NIAH).get_json()["data"]["job"]["id"]
    queue_on(factory).claim("w")
    queue_on(factory).record_sample(job_id, "w", dict(
        idx=0, prompt="p, with comma", prompt_tokens=3, prediction='say "hi"\nthere', score=1.0,
        latency_s=0.5, output_tokens=2, fields={"context_length": 256, "depth_percent": 50.0}))
    queue_on(factory).finish(job_id, "w", JobState.SUCCEEDED)
    res = client.get(f"/api/jobs/{job_id}/export?format=json")
    body = res.get_json()
    assert body["job"]["id"] == job_id and body["samples"][0]["prediction"] == 'say "hi"\nthere'
    assert "attachment" in res.headers["Content-Disposition"]
    res = client.get(f"/api/jobs/{job_id}/export?format=csv")
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(res.get_data(as_text=True))))
    assert rows[0]["prediction"] == 'say "hi"\nthere' and rows[0]["context_length"] == "256"
    assert client.get(f"/api/jobs/{job_id}/export?format=xml").status_code == 422
    assert client.get("/api/jobs/999/export").status_code == 404


def test_no_false_no_live_worker_while_the_servers_workers_start(client, app):
    import time

    job = client.post("/api/jobs", json=NIAH).get_json()["data"]["job"]
    assert job["waiting_reason"].startswith("no live worker")  # the server starts none
    app.extensions["lbs"].workers_spawned_at = time.monotonic() - 5  # as WorkerPool sets it
    job = client.get(f"/api/jobs/{job['id']}").get_json()["data"]["job"]
    assert job["waiting_reason"].startswith("the worker is starting (started 5 s ago)")
    app.extensions["lbs"].workers_spawned_at = time.monotonic() - 3600  # long ago: say so
    job = client.get(f"/api/jobs/{job['id']}").get_json()["data"]["job"]
    assert job["waiting_reason"].startswith("no live worker")


def test_memory_sizes_keep_the_briefs_shape(client):
    """The brief's memory API writes 8589934592 bytes as "8.00 GB" (a GB being 2**30
    bytes, the one unit of every size here); its formatted_* fields keep that text."""
    status = client.post("/api/v1/memory/limit?limit_gb=8", headers={"Origin": "http://localhost"})
    body = status.get_json()
    assert body["data"]["memory_limit"] == 8589934592, body
    assert body["data"]["formatted_limit"] == "8.00 GB"
    system = client.get("/api/v1/memory/system").get_json()["data"]
    assert system["memory"]["formatted_total"].endswith(" GB")


def test_validator_messages_read_without_pydantic_prefix(client):
    """A dataset's own check ("every depth must be between 0 and 100") reaches the user
    as written, not as pydantic's "Value error, every depth …"."""
    job = {**NIAH, "params": {"context_lengths": [256], "depth_percents": [150]}}
    res = client.post("/api/jobs", json=job)
    assert res.status_code == 422, res.get_json()
    error = res.get_json()["error"]
    assert error["details"] == [{"field": "params.depth_percents",
                                 "message": "every depth must be between 0 and 100"}]
    assert "Value error" not in error["message"]


def test_job_shows_its_effective_parameters_beside_those_sent(client):
    """A job's record carries what it runs with: the parameters sent, and every default
    of its dataset filled in (split, chat template, max_new_tokens…)."""
    job = client.post("/api/jobs", json=NIAH).get_json()["data"]["job"]
    shown = client.get(f"/api/jobs/{job['id']}").get_json()["data"]["job"]
    assert shown["params"] == NIAH["params"]
    effective = shown["effective_params"]
    assert effective["context_lengths"] == [256] and effective["depth_percents"] == [50]
    assert {"max_new_tokens", "batch_size", "use_chat_template"} <= set(effective), effective
    gsm8k = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": "gsm8k"})
    if gsm8k.status_code == 201:  # its data is bundled or fetched here
        effective = gsm8k.get_json()["data"]["job"]["effective_params"]
        assert gsm8k.get_json()["data"]["job"]["params"] == {} and "split" in effective
    listed = client.get("/api/jobs").get_json()["data"]["jobs"][0]
    assert "effective_params" not in listed  # the list stays short, as without params
