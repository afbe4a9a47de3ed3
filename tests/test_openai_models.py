"""Models behind an OpenAI-compatible API, against a real HTTP server on loopback that
serves the built-in tiny model (tests/openai_server.py): the same answers as the
model run locally, retries on 429/5xx/timeouts/bad JSON, bounded concurrency,
log-likelihood through echo + logprobs, and the key never leaking."""

from __future__ import annotations

import pytest

from backend.runners.base import GenerationRequest, LoglikelihoodRequest
from backend.runners.openai_api import ApiError, ApiOptions, OpenAIRunner
from tests.openai_server import FakeOpenAI

KEY = "sk-test-5ecret-key-never-logged"


@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory):
    from backend.config import load_settings
    from backend.runners.hf import HFRunner, LoadOptions
    from backend.runners.models import resolve_model

    settings = load_settings({"LBS_DATA_DIR": str(tmp_path_factory.mktemp("oa-data"))})
    spec = resolve_model("builtin:tiny", settings)
    return HFRunner.load(spec, LoadOptions.from_settings(settings), settings)


@pytest.fixture
def fake(tiny_runner):
    server = FakeOpenAI(tiny_runner, api_key=KEY).start()
    yield server
    server.stop()


def _client(fake, tiny_runner, **options) -> OpenAIRunner:
    opts = ApiOptions(base_url=fake.url, **{"max_retries": 3, **options})
    return OpenAIRunner("openai:tiny", "tiny", opts, KEY, tiny_runner.tok,
                        tiny_runner.max_length)


PROMPTS = ["The sea was calm and the sky", "Aunt Margit cooked goulash on", "One two three"]


def test_chat_and_completions_answer_like_the_local_model(fake, tiny_runner):
    local = tiny_runner.generate([GenerationRequest(tiny_runner.render(p), 8) for p in PROMPTS])
    chat = _client(fake, tiny_runner).generate([GenerationRequest(p, 8) for p in PROMPTS])
    assert [g.text for g in chat] == [g.text for g in local]
    assert [g.prompt_tokens for g in chat] == [g.prompt_tokens for g in local]
    assert all(g.output_tokens == 8 and g.extra["api"]["attempts"] == 1 for g in chat)
    assert chat[0].extra["api"]["usage"]["completion_tokens"] == 8

    completions = _client(fake, tiny_runner, endpoint="completions")
    rendered = [completions.render(p) for p in PROMPTS]
    assert [g.text for g in completions.generate([GenerationRequest(r, 8) for r in rendered])] \
        == [g.text for g in local]


def test_retries_on_429_500_bad_json_and_timeouts(fake, tiny_runner):
    runner = _client(fake, tiny_runner, timeout_s=0.5, concurrency=1, max_retries=4)
    fake.failures = ["429", "500", "badjson", "slow"]
    fake.slow_seconds = 1.5
    (gen,) = runner.generate([GenerationRequest(PROMPTS[0], 4)])
    assert gen.extra["api"]["attempts"] == 5 and runner.stats.retries == 4
    assert [r["outcome"] for r in fake.requests] == ["429", "500", "badjson", "slow", "ok"]

    fake.failures = ["500"] * 10
    with pytest.raises(ApiError,
                       match=r"HTTP 500: The server had an error \(gave up after 4 attempts\)"):
        _client(fake, tiny_runner).generate([GenerationRequest(PROMPTS[0], 4)])


def test_wrong_key_and_unknown_model_fail_at_once_without_the_key(fake, tiny_runner):
    opts = ApiOptions(base_url=fake.url)
    wrong = OpenAIRunner("openai:tiny", "tiny", opts, "sk-wrong-" + KEY, tiny_runner.tok, 512)
    with pytest.raises(ApiError) as err:
        wrong.generate([GenerationRequest("hi", 2)])
    assert "HTTP 401" in str(err.value) and "sk-wrong" not in str(err.value)
    assert KEY not in str(err.value)
    missing = OpenAIRunner("openai:nope", "nope", opts, KEY, tiny_runner.tok, 512)
    with pytest.raises(ApiError, match="HTTP 404.*does not exist"):
        missing.generate([GenerationRequest("hi", 2)])
    assert len(fake.requests) == 2  # neither was retried


def test_concurrency_is_bounded(fake, tiny_runner):
    fake.failures = ["slow"] * 6
    fake.slow_seconds = 0.3
    runner = _client(fake, tiny_runner, concurrency=3)
    runner.generate([GenerationRequest(p, 2) for p in PROMPTS * 2])
    assert fake.max_in_flight == 3


def test_loglikelihood_through_echo_logprobs(fake, tiny_runner):
    requests = [LoglikelihoodRequest("Question: what did Aunt Margit cook? Answer:", c)
                for c in (" goulash", " soup", " B")]
    local = tiny_runner.without_chat_template().loglikelihood(requests)
    remote = _client(fake, tiny_runner, endpoint="completions").loglikelihood(requests)
    for a, b in zip(local, remote, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-3)
        assert b.tokens == a.tokens and b.is_greedy == a.is_greedy

    with pytest.raises(ApiError, match="completions endpoint with echo and logprobs"):
        _client(fake, tiny_runner).loglikelihood(requests)
    fake.logprobs = False
    with pytest.raises(ApiError, match="did not return prompt log-probabilities"):
        _client(fake, tiny_runner, endpoint="completions").loglikelihood(requests)


def test_options_validation():
    with pytest.raises(ValueError, match="http"):
        ApiOptions(base_url="ftp://x")
    opts = ApiOptions(base_url="http://h/v1/", api_key="sk-1")
    assert opts.base_url == "http://h/v1"
    assert "api_key" not in opts.public() and "sk-1" not in repr(opts)


# --- jobs through the server: settings, the api object, the key at rest ----------------

NIAH = {"context_lengths": [256, 384], "depth_percents": [0, 100], "max_new_tokens": 8}


def _leaks(server, key: str, responses: list) -> list[str]:
    """Where `key` shows up: the server's log (server and worker), the SQLite files, or
    any response the API gave."""
    import json

    places = []
    files = list(server.data_dir.glob("lbs.sqlite3*"))
    assert files and "[Worker]" in server.log()  # there is something to look in
    if key in server.log():
        places.append("server log")
    for path in server.data_dir.glob("lbs.sqlite3*"):
        if key.encode() in path.read_bytes():
            places.append(path.name)
    if any(key in json.dumps(r) for r in responses):
        places.append("API response")
    return places


def test_openai_job_end_to_end_and_the_key_never_leaks(fake, with_tiny):
    from tests.conftest import LiveServer

    server = LiveServer(with_tiny, {"LBS_LOG_LEVEL": "DEBUG"}).start()
    try:
        fake.failures = ["429", "badjson", "slow", "500"]
        fake.slow_seconds = 2.0
        api = {"base_url": fake.url, "api_key": KEY, "concurrency": 2, "timeout_s": 1.0,
               "max_retries": 5}
        status, submitted = server.request("POST", "/api/jobs", {
            "model": "openai:tiny", "dataset": "needle_in_haystack", "params": NIAH,
            "api": api})
        assert status == 201, submitted
        job = submitted["data"]["job"]
        assert job["api"]["base_url"] == fake.url and job["api"]["concurrency"] == 2
        assert "api_key" not in job["api"] and job["api_key_set"] is True
        local_id = server.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "needle_in_haystack",
            "params": NIAH})[1]["data"]["job"]["id"]

        remote = server.wait_for(job["id"], ("succeeded", "failed"))
        assert remote["state"] == "succeeded", remote["error"]
        local = server.wait_for(local_id, ("succeeded", "failed"))
        samples = server.request("GET", f"/api/jobs/{job['id']}/samples?per_page=100")[1]
        local_samples = server.request("GET", f"/api/jobs/{local_id}/samples?per_page=100")[1]
        by_idx = {s["idx"]: s for s in local_samples["data"]["samples"]}
        rows = samples["data"]["samples"]
        assert len(rows) == 4
        for row in rows:  # the served model answers as the model run locally does
            assert row["prediction"] == by_idx[row["idx"]]["prediction"]
            assert row["score"] == by_idx[row["idx"]]["score"]
            usage = row["fields"]["api"]["usage"]
            assert usage["completion_tokens"] >= 1 and row["latency_s"] > 0
        assert remote["scores"]["overall"] == local["scores"]["overall"]
        outcomes = [r["outcome"] for r in fake.requests]
        assert {"429", "badjson", "slow", "500"} <= set(outcomes) and outcomes.count("ok") == 4
        assert sum(r["fields"]["api"]["attempts"] for r in rows) == 8  # 4 retried once
        assert all(r["auth_ok"] for r in fake.requests)

        # A wrong key fails the job with the server's answer, not with the key.
        wrong = "sk-wrong-" + KEY[::-1]
        bad = server.request("POST", "/api/jobs", {
            "model": "openai:tiny", "dataset": "needle_in_haystack", "params": NIAH,
            "api": {**api, "api_key": wrong}})[1]["data"]["job"]
        failed = server.wait_for(bad["id"], ("succeeded", "failed"))
        assert failed["state"] == "failed" and "HTTP 401" in failed["error"]

        responses = [submitted, remote, failed, samples,
                     server.request("GET", "/api/jobs?per_page=100")[1],
                     server.request("GET", f"/api/jobs/{job['id']}/export?format=json")[1]]
        assert _leaks(server, KEY, responses) == []
        assert _leaks(server, wrong, responses) == []
        assert (server.data_dir / "secret.key").stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()


def test_openai_job_fields_are_checked_at_submit(client, monkeypatch):
    def submit(**job):
        res = client.post("/api/jobs", json={"dataset": "needle_in_haystack",
                                             "params": NIAH, **job})
        body = res.get_json()
        return res.status_code, [d["field"] for d in body["error"]["details"]] \
            if res.status_code >= 400 else body

    LOCAL = "http://127.0.0.1:9/v1"  # noqa: N806 - loopback: allowed without a token
    assert submit(model="openai:tiny") == (422, ["api.base_url"])  # no setting, no job URL
    assert submit(model="builtin:tiny", api={"base_url": LOCAL}) == (422, ["api"])
    assert submit(model="openai:tiny", api={"base_url": "ftp://x"}) == (422, ["api.base_url"])
    assert submit(model="openai:tiny", api={"base_url": LOCAL, "concurrency": 0}) \
        == (422, ["api.concurrency"])
    status, fields = submit(model="openai:tiny", api={"base_url": LOCAL, "api_key": 7})
    assert (status, fields) == (422, ["api.api_key"])
    assert submit(model="openai:tiny", api={"base_url": LOCAL},
                  params={**NIAH, "methods": ["basic"]}) == (422, ["params.methods"])
    status, body = submit(model="openai:tiny", api={"base_url": LOCAL, "api_key": KEY})
    assert status == 201 and KEY not in str(body)
    assert body["data"]["job"]["memory_estimate_bytes"] is None  # needs no GPU here
