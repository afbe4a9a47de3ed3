"""A hub model that is not in the cache, with LBS_ALLOW_DOWNLOAD=1: while the worker
downloads it the job shows a "downloading model" phase (it sat silent on "running"
until the download failed), and a failed download says what to do."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from backend.queue import jobs
from tests.conftest import ARTIFACTS, LiveServer

REPO = "someone/not-cached-model"
NIAH = {"context_lengths": [256], "depth_percents": [50], "max_new_tokens": 4}


class _SlowMissingHub(BaseHTTPRequestHandler):
    """A hub that answers every request slowly, and that it has no such repository:
    a slow network to a hub that lacks the model."""

    delay_s = 0.5

    def _answer(self) -> None:
        time.sleep(self.delay_s)
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "2")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"{}")

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


def test_a_hub_model_download_shows_its_phase_and_why_it_failed(client, monkeypatch):
    from backend.apps.worker import Worker
    from backend.common.config import load_settings

    hub = ThreadingHTTPServer(("127.0.0.1", 0), _SlowMissingHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    monkeypatch.setenv("LBS_ALLOW_DOWNLOAD", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    url = f"http://127.0.0.1:{hub.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)  # read at import: set where it was read
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", url)
    monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    worker = Worker(load_settings(), worker_id="w")
    worker.start()
    (job,) = worker.queue.submit([jobs.NewJob(REPO, "needle_in_haystack", NIAH)])
    runner = threading.Thread(target=worker.run_once)
    runner.start()
    phases = []
    try:
        while runner.is_alive():
            seen = client.get(f"/api/jobs/{job.id}").get_json()["data"]["job"]
            phases.append(seen["phase"])
            time.sleep(0.05)
    finally:
        runner.join()
        worker.stop()
        worker.manager.stop_monitor()
        hub.shutdown()
    assert "downloading model" in phases, phases
    done = client.get(f"/api/jobs/{job.id}").get_json()["data"]["job"]
    assert done["state"] == "failed" and done["phase"] is None
    (download,) = [e for e in done["events"] if e["kind"] == "model_download"]
    assert download["state"] == "failed" and download["model"] == REPO
    assert REPO in done["error"] and "download" in done["error"]


class _SlowerMissingHub(_SlowMissingHub):
    delay_s = 2.0  # the queue polls every 1.5 s


@pytest.mark.slow
def test_the_queue_shows_the_download(with_tiny, page):
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _SlowerMissingHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    live = LiveServer(with_tiny, {"LBS_ALLOW_DOWNLOAD": "1", "HF_HUB_OFFLINE": "0",
                                  "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}"})
    try:
        live.start().wait_for_worker()
        status, body = live.request("POST", "/api/jobs", {
            "model": REPO, "dataset": "needle_in_haystack", "params": NIAH})
        assert status == 201, body
        page.goto(live.url + "/#/queue")
        row = page.locator('tr[data-job="1"]')
        row.get_by_text("downloading the model from the hub").wait_for(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "queue-model-download.png", full_page=True)
        job = live.wait_for(1, ("failed", "succeeded"))
        assert job["state"] == "failed" and REPO in job["error"]
        row.locator(".badge.failed").wait_for()
        assert "downloading" not in row.inner_text()
    finally:
        page.goto("about:blank")  # no poll of the queue outlives the server
        live.stop()
        hub.shutdown()
