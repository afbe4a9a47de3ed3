"""Models behind an OpenAI-compatible API, against the loopback fake (tests/openai_server.py)
for what a real server does not do on demand: retries on 429/5xx/timeouts/bad JSON,
bounded concurrency, the key checked and never leaking, llama-cpp-python's echo +
logprobs (and its `max_tokens: 0`), errors naming a missing chat template. The same
jobs against a real server (`transformers serve`) are in tests/test_openai_serve.py."""

from __future__ import annotations

import pytest

from backend.engine.contracts import GenerationRequest, LoglikelihoodRequest
from backend.runners.openai.options import ApiOptions
from backend.runners.openai.runner import OpenAIRunner
from backend.runners.openai.transport import RemoteApiError
from tests.openai_server import FakeOpenAI

KEY = "sk-test-5ecret-key-never-logged"


@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory):
    from backend.common.config import load_settings
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.runner import HFRunner
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


def test_retries_on_429_500_bad_json_and_timeouts(fake, tiny_runner):
    # generous margins: a loaded CI box must answer the good request within timeout_s
    runner = _client(fake, tiny_runner, timeout_s=2.0, concurrency=1, max_retries=4)
    fake.failures = ["429", "500", "badjson", "slow"]
    fake.slow_seconds = 4.0
    (gen,) = runner.generate([GenerationRequest(PROMPTS[0], 4)])
    assert gen.extra["api"]["attempts"] == 5 and runner.stats.retries == 4
    assert [r["outcome"] for r in fake.requests] == ["429", "500", "badjson", "slow", "ok"]

    fake.failures = ["500"] * 10
    with pytest.raises(RemoteApiError, match=r"HTTP 500: The server had an error \(gave up after 4 "
                                        r"attempts\)"):
        _client(fake, tiny_runner).generate([GenerationRequest(PROMPTS[0], 4)])


def test_wrong_key_and_unknown_model_fail_at_once_without_the_key(fake, tiny_runner):
    opts = ApiOptions(base_url=fake.url)
    wrong = OpenAIRunner("openai:tiny", "tiny", opts, "sk-wrong-" + KEY, tiny_runner.tok, 512)
    with pytest.raises(RemoteApiError) as err:
        wrong.generate([GenerationRequest("hi", 2)])
    assert "HTTP 401" in str(err.value) and "sk-wrong" not in str(err.value)
    assert KEY not in str(err.value)
    missing = OpenAIRunner("openai:nope", "nope", opts, KEY, tiny_runner.tok, 512)
    with pytest.raises(RemoteApiError, match="HTTP 404.*does not exist"):
        missing.generate([GenerationRequest("hi", 2)])
    assert len(fake.requests) == 2  # neither was retried


def test_concurrency_is_bounded(fake, tiny_runner):
    fake.failures = ["slow"] * 6
    fake.slow_seconds = 0.3
    runner = _client(fake, tiny_runner, concurrency=3)
    runner.generate([GenerationRequest(p, 2) for p in PROMPTS * 2])
    assert fake.max_in_flight == 3


QUESTION = "Question: what did Aunt Margit cook? Answer:"
CHOICES = (" goulash", " soup", " B")


def test_loglikelihood_counts_only_the_echoed_prompt_like_llama_cpp(fake, tiny_runner):
    """llama-cpp-python reads max_tokens 0 as "generate until the context is full": the
    runner asks for one token and sums only the echoed prompt's continuation tokens, so
    the scores are the local model's."""
    requests = [LoglikelihoodRequest(QUESTION, c) for c in CHOICES]
    # one split rule for both runners: the context's trailing newline is scored too
    requests += [LoglikelihoodRequest("Question: what did Aunt Margit cook?\nAnswer:\n", "A")]
    local = tiny_runner.loglikelihood([LoglikelihoodRequest(r.context, r.continuation,
                                                            chat_template=False)
                                       for r in requests])
    remote = _client(fake, tiny_runner, endpoint="completions").loglikelihood(requests)
    for a, b in zip(local, remote, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-3)
        assert b.tokens == a.tokens and b.is_greedy == a.is_greedy
    bodies = [r["body"] for r in fake.requests]
    # the first request alone, the others concurrently: in any order
    assert len(bodies) == 4 and bodies[0]["prompt"] == QUESTION + CHOICES[0]
    assert sorted(b["prompt"] for b in bodies[:4]) == sorted(
        [QUESTION + c for c in CHOICES] + ["Question: what did Aunt Margit cook?\nAnswer:\nA"])
    assert all(b["max_tokens"] == 1 and b["echo"] is True for b in bodies)

    with pytest.raises(RemoteApiError, match="completions endpoint with echo and logprobs"):
        _client(fake, tiny_runner).loglikelihood(requests)


def test_loglikelihood_without_echo_fails_at_the_first_request(fake, tiny_runner):
    """A server that ignores echo/logprobs (transformers serve: 200 without logprobs, and
    HTTP 500 for max_tokens 0) is named at once, without retries."""
    fake.logprobs = False
    requests = [LoglikelihoodRequest(QUESTION, c) for c in CHOICES]
    runner = _client(fake, tiny_runner, endpoint="completions", max_retries=4)
    with pytest.raises(RemoteApiError, match="this endpoint must return prompt log-probabilities"):
        runner.loglikelihood(requests)
    assert len(fake.requests) == 1 and runner.stats.retries == 0
    # a server that answers the first echo request with a 500 is not retried either
    fake.logprobs, fake.failures = True, ["500"]
    with pytest.raises(RemoteApiError, match="must return prompt log-probabilities.*HTTP 500"):
        runner.loglikelihood(requests)
    assert len(fake.requests) == 2 and runner.stats.retries == 0


def test_loglikelihood_fails_when_the_tokens_do_not_cover_the_prompt(fake, tiny_runner):
    """logprobs of the generated token only (echo ignored) must not be read as the
    continuation's."""
    fake.failures = ["noecho"]
    runner = _client(fake, tiny_runner, endpoint="completions")
    with pytest.raises(RemoteApiError, match="do not cover the prompt"):
        runner.loglikelihood([LoglikelihoodRequest(QUESTION, " goulash")])


def test_chat_template_error_shows_the_remote_reason_and_suggests_completions(fake,
                                                                              tiny_runner):
    fake.failures = ["notemplate"]
    with pytest.raises(RemoteApiError) as err:
        _client(fake, tiny_runner).generate([GenerationRequest(PROMPTS[0], 4)])
    text = str(err.value)
    assert "HTTP 400" in text and "default chat template is no longer allowed" in text
    assert "\x1b" not in text and "\n" not in text and len(text) < 700
    assert 'api.endpoint "completions"' in text


def test_completions_send_the_prompt_as_a_local_run_would(fake, tiny_runner):
    """use_chat_template false (C-Eval's log-likelihood prompts): the completions
    endpoint gets the dataset's prompt without the tokenizer's chat template."""
    runner = _client(fake, tiny_runner, endpoint="completions")
    assert runner.render("Question: 1+1?", chat_template=False) == "Question: 1+1?"
    assert runner.count_prompt("Question: 1+1?", chat_template=False) \
        == tiny_runner.count_prompt("Question: 1+1?", chat_template=False)
    assert runner.render("hi") == tiny_runner.render("hi")  # datasets that want it keep it


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


def test_a_tokenizer_outside_the_model_dirs_is_refused_with_403(client, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    for name in (str(outside), "../elsewhere", "/etc"):
        res = client.post("/api/jobs", json={
            "model": "openai:tiny", "dataset": "needle_in_haystack", "params": NIAH,
            "api": {"base_url": "http://127.0.0.1:9/v1", "tokenizer": name}})
        body = res.get_json()
        assert res.status_code == 403, body
        assert body["error"]["code"] == "path_refused"
        assert [d["field"] for d in body["error"]["details"]] == ["api.tokenizer"]
        assert "refused" in body["error"]["message"]
    res = client.post("/api/jobs", json={  # a missing one is still a 422
        "model": "openai:tiny", "dataset": "needle_in_haystack", "params": NIAH,
        "api": {"base_url": "http://127.0.0.1:9/v1", "tokenizer": "builtin:nope"}})
    assert res.status_code == 422 and res.get_json()["error"]["code"] == "invalid_job"


def test_chat_prompt_budgets_count_the_servers_chat_template(fake, tiny_runner):
    """NIAH fills a budget with count_prompt: over the chat endpoint the server wraps the
    message in its template, so the count includes it (1028 tokens for 1024 before)."""
    from backend.datasets.registry import get_dataset

    runner = _client(fake, tiny_runner)
    message = "Read the text and answer: where is the needle?"
    assert runner.count_prompt(message) == tiny_runner.count_prompt(tiny_runner.render(message))
    ds = get_dataset("needle_in_haystack")
    params = ds.parse_params({"context_lengths": [200], "depth_percents": [50],
                              "max_new_tokens": 2})
    (item,) = ds.build_items(params, runner)
    (gen,) = runner.generate([GenerationRequest(item.prompt, 2)])
    assert 0.9 * 200 <= gen.prompt_tokens <= 200  # what the server says it was fed


def _answer(tokens, values, generated=1, offsets=None):
    logprobs = {"tokens": tokens, "token_logprobs": values,
                "top_logprobs": [None] + [{t: v} for t, v in zip(tokens[1:], values[1:],
                                                                strict=True)]}
    if offsets is not None:
        logprobs["text_offset"] = offsets
    usage = {"completion_tokens": generated} if generated is not None else {}
    return {"choices": [{"text": "", "logprobs": logprobs}], "usage": usage}


def test_reading_prompt_logprobs_as_servers_send_them():
    from backend.runners.openai.runner import read_prompt_logprobs

    # vLLM: the BOS token's text first, then the prompt, then the generated token
    got = read_prompt_logprobs(_answer(["<s>", "Answer", ":", " A", " B"],
                                       [None, -1.0, -2.0, -0.5, -9.0]), "Answer:", " A")
    assert (got.logprob, got.tokens, got.is_greedy) == (-0.5, 1, True)
    # one token spanning context and continuation is scored with it, as a local split is
    got = read_prompt_logprobs(_answer(["Answer", ": A", "x"], [None, -2.0, -7.0]),
                               "Answer:", " A")
    assert (got.logprob, got.tokens) == (-2.0, 1)
    # byte pieces of a character come back as U+FFFD: the continuation still checks out
    got = read_prompt_logprobs(_answer(["\ufffd", "\ufffd", "\ufffd", " A", "x"],
                                       [None, -1.0, -1.0, -3.0, -1.0]), "答", " A")
    assert got.logprob == -3.0
    # without usage, text offsets tell the generated tokens apart
    got = read_prompt_logprobs(_answer(["Answer", ":", " A", " B", " C"],
                                       [None, -1.0, -0.5, -4.0, -4.0], generated=None,
                                       offsets=[0, 6, 7, 9, 11]), "Answer:", " A")
    assert (got.logprob, got.tokens) == (-0.5, 1)
    # the generated tokens only (echo ignored), or a prompt that is not ours: refused
    for answer in (_answer([" B"], [-1.0], generated=1),
                   _answer(["Question", ":", " A", "x"], [None, -1.0, -1.0, -1.0])):
        with pytest.raises(RemoteApiError, match="do not cover the prompt"):
            read_prompt_logprobs(answer, "Answer:", " A")
    with pytest.raises(RemoteApiError, match="this endpoint must return prompt log-probabilities"):
        read_prompt_logprobs({"choices": [{"text": "x", "logprobs": None}]}, "Answer:", " A")


def test_remote_error_messages_are_cleaned():
    from backend.runners.openai.transport import remote_message

    assert remote_message(b'{"error": {"message": "bad\\n\\u001b[31mtemplate\\u001b[0m\\tx"}}') \
        == "bad template x"
    assert remote_message(b'{"detail": "Server is pinned to m"}') == "Server is pinned to m"
    assert remote_message(b'{"error": "quota"}') == "quota"
    assert remote_message(b"<html><body>nginx internal page</body></html>") == ""
    assert remote_message(b"[" * 100000) == ""
    long = remote_message(b'{"message": "' + b"x" * 5000 + b'"}')
    assert len(long) == 300 and long.endswith("\u2026")
