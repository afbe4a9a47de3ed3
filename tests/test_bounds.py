"""What one request may cost the server, its workers and its database: a remote
answer of megabytes is stored cut (with a mark saying so), a job's context has a
ceiling at submission, a haystack file is size-checked without being read on the
request path, and lm-eval data is not downloaded where downloads are off."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from backend.queue.jobs import MAX_STORED_PREDICTION
from tests.conftest import LiveServer

NIAH = {"context_lengths": [256], "depth_percents": [50], "max_new_tokens": 8}


class HugeAnswers:
    """An OpenAI-compatible server on loopback whose every answer is `size` characters."""

    def __init__(self, size: int):
        answer = "paprika " + "x" * (size - 8)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.dumps({"object": "chat.completion", "model": "big", "choices": [
                    {"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 8}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_huge_remote_answer_is_stored_cut_and_says_so(client, settings):
    from tests.conftest import work_one_job

    remote = HugeAnswers(4 * 1024**2)
    try:
        res = client.post("/api/jobs", json={
            "model": "openai:big", "dataset": "needle_in_haystack", "params": NIAH,
            "api": {"base_url": remote.url, "max_retries": 0}})
        assert res.status_code == 201, res.get_json()
        job_id = res.get_json()["data"]["job"]["id"]
        work_one_job(settings)
    finally:
        remote.stop()
    job = client.get(f"/api/jobs/{job_id}").get_json()["data"]["job"]
    assert job["state"] == "succeeded", job["error"]
    (sample,) = client.get(f"/api/jobs/{job_id}/samples").get_json()["data"]["samples"]
    text = sample["prediction"]
    assert text.startswith("paprika xxx")
    assert len(text) < MAX_STORED_PREDICTION + 200
    assert text.endswith(f"[cut: the answer has {4 * 1024**2} characters; the first "
                         f"{MAX_STORED_PREDICTION} are stored]")
    assert sample["fields"]["prediction_cut"] == {
        "stored_chars": MAX_STORED_PREDICTION, "total_chars": 4 * 1024**2}
    assert sample["score"] > 0  # scored on the whole answer, before the cut
    stored = sum(p.stat().st_size for p in settings.data_dir.glob("lbs.sqlite3*"))
    assert stored < 2 * 1024**2, stored


def _slow_post(live, path: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(live.url + path, data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_lm_eval_data_is_not_downloaded_where_downloads_are_off(with_tiny, tmp_path):
    """LBS_ALLOW_DATA_DOWNLOAD=0 (the default) with a reachable hub (the loopback
    stand-in in HF_ENDPOINT, offline modes off): a job submitted while the task index is
    still being built reaches the worker, which reads the datasets cache only and fails
    saying how to get the data; once the index is there the job is refused at
    submission with data_missing. No request reaches the hub either way."""
    from tests.hub_server import FakeHub, official_repos
    from tests.test_lm_eval import _task_list
    from tests.test_lm_eval_catalog import GSM8K_JOB, GSM8K_README

    hub = FakeHub({"openai/gsm8k": {**official_repos()["openai/gsm8k"],
                                    "README.md": GSM8K_README}}).start()
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
           "HF_DATASETS_OFFLINE": "0", "LBS_ALLOW_DATA_DOWNLOAD": "0"}
    live = LiveServer(with_tiny, env).start()
    try:
        # the index is not ready: the job's request lengths are built at submission (slow)
        status, body = _slow_post(live, "/api/jobs", GSM8K_JOB)
        assert status == 201, body
        job = live.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"), timeout=300)
        assert job["state"] == "failed", job
        for words in ("gsm8k", "LBS_ALLOW_DATA_DOWNLOAD=0",
                      "data fetch lm_eval --tasks gsm8k"):
            assert words in job["error"], job["error"]

        _task_list(live, limit=1)
        status, body = live.request("POST", "/api/jobs", GSM8K_JOB)
        assert status == 422 and body["error"]["code"] == "data_missing", body
        assert body["error"]["details"][0]["field"] == "params.tasks"
        assert body["error"]["guidance"]["downloads_allowed"] is False
        assert hub.requests == []
    finally:
        live.stop()
        hub.stop()


def _niah_openai(lengths: list[int]) -> dict:
    return {"model": "openai:x", "dataset": "needle_in_haystack",
            "params": {"context_lengths": lengths, "depth_percents": [50]},
            "api": {"base_url": "http://127.0.0.1:9/v1", "max_length": 2 * 10**9}}


def test_every_job_has_a_context_ceiling_and_its_prompt_ram_is_counted(monkeypatch, data_dir,
                                                                       with_tiny):
    """A remote model that says it takes 2e9 tokens still meets the server's ceiling
    (LBS_MAX_CONTEXT_LENGTH has a finite default); raised knowingly, the RAM building
    the prompts would take is counted at submission against the machine's."""
    from backend.common.config import load_settings
    from backend.server import create_app

    client = create_app(load_settings(), {"TESTING": True}).test_client()
    res = client.post("/api/jobs", json=_niah_openai([10**9]))
    assert res.status_code == 422, res.get_json()
    (detail,) = res.get_json()["error"]["details"]
    assert detail["field"] == "params.context_lengths"
    assert "131072" in detail["message"] and "LBS_MAX_CONTEXT_LENGTH" in detail["message"]
    assert client.post("/api/jobs", json=_niah_openai([4096])).status_code == 201

    monkeypatch.setenv("LBS_MAX_CONTEXT_LENGTH", str(10**9))
    client = create_app(load_settings(), {"TESTING": True}).test_client()
    res = client.post("/api/jobs", json=_niah_openai([10**9]))
    assert res.status_code == 422, res.get_json()
    (detail,) = res.get_json()["error"]["details"]
    assert detail["field"] == "params.context_lengths"
    assert "GiB of RAM" in detail["message"] and "this machine has" in detail["message"]
    assert client.get("/api/jobs").get_json()["data"]["total"] == 1


def test_the_worker_counts_the_prompts_ram_before_building_them(monkeypatch, client,
                                                                 settings, with_tiny):
    """A job admitted on the machine's total RAM is refused by the worker, before any
    prompt is built, when that RAM is not available then."""
    import psutil

    from backend.datasets import needle_in_haystack as niah
    from tests.conftest import work_one_job

    res = client.post("/api/jobs", json={"model": "builtin:tiny",
                                         "dataset": "needle_in_haystack",
                                         "params": {"context_lengths": [512],
                                                    "depth_percents": [50]}})
    assert res.status_code == 201, res.get_json()
    real = psutil.virtual_memory
    monkeypatch.setattr(niah.psutil, "virtual_memory",
                        lambda: real()._replace(available=100 * 1024))
    work_one_job(settings)
    job = client.get(f"/api/jobs/{res.get_json()['data']['job']['id']}").get_json()
    job = job["data"]["job"]
    assert job["state"] == "failed" and "this machine has available" in job["error"], job
    assert job["progress"]["done"] == 0


@pytest.mark.slow
def test_a_haystack_file_is_size_checked_not_read_at_submission(with_tiny, tmp_path):
    """Estimates of a job naming a 30 MB haystack file neither take long nor leave the
    server bigger; a file over LBS_MAX_HAYSTACK_BYTES is refused naming the field."""
    import psutil

    from backend.datasets.needle_in_haystack import BUNDLED_HAYSTACKS

    folder = tmp_path / "datasets"
    folder.mkdir()
    essays = BUNDLED_HAYSTACKS["essays"].read_bytes()
    (folder / "big.txt").write_bytes(essays * (30 * 1024**2 // len(essays)))
    (folder / "huge.txt").write_bytes(essays * (40 * 1024**2 // len(essays)))
    live = LiveServer(with_tiny, {"LBS_DATASETS_DIR": str(folder), "LBS_WORKERS": "0"}).start()
    try:
        job = {"model": "builtin:tiny", "dataset": "needle_in_haystack",
               "params": {"context_lengths": [512], "depth_percents": [50],
                          "haystack": "big.txt"}}
        server = psutil.Process(live.proc.pid)
        warm_up = {**job, "params": {**job["params"], "haystack": "essays"}}
        assert live.request("POST", "/api/jobs/estimate", warm_up)[0] == 200
        before = server.memory_info().rss
        for _ in range(3):
            started = time.monotonic()
            status, body = live.request("POST", "/api/jobs/estimate", job)
            assert status == 200, body
            assert time.monotonic() - started < 3
        grown = server.memory_info().rss - before
        assert grown < 10 * 1024**2, f"the server grew by {grown} bytes"

        job["params"]["haystack"] = "huge.txt"
        status, body = live.request("POST", "/api/jobs", job)
        assert status == 422, body
        (detail,) = body["error"]["details"]
        assert detail["field"] == "params.haystack"
        assert "LBS_MAX_HAYSTACK_BYTES" in detail["message"]
    finally:
        live.stop()
