"""Official data by hub id, end to end against a loopback stand-in for the hub
(tests/hub_server.py through HF_ENDPOINT; nothing reaches the internet): the first job
fetches with a visible "fetching data" phase, later jobs read the cache, offline mode
reads it too, /api/datasets says what is ready and how to get the rest, and the
submit-time 422 carries the same guidance."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from backend.common.commands import lbs_command
from tests.conftest import ROOT, LiveServer
from tests.hub_server import FakeHub

pytestmark = pytest.mark.slow

CEVAL_LAW = {"model": "builtin:tiny", "dataset": "ceval",
             "params": {"subjects": ["law"], "shots": 1}}


@pytest.fixture
def hub():
    server = FakeHub().start()
    yield server
    server.stop()


def _env(hub, tmp_path, **extra):
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def _datasets(live):
    status, body = live.request("GET", "/api/datasets")
    assert status == 200, body
    return {d["name"]: d for d in body["data"]["datasets"]}


def test_job_fetches_then_reads_cache_then_offline(with_tiny, hub, tmp_path):
    hub.delay_s = 1.0  # per file: the fetch lasts a few seconds, long enough to watch
    env = _env(hub, tmp_path, LBS_ALLOW_DATA_DOWNLOAD="1")
    live = LiveServer(with_tiny, env).start()
    try:
        before = _datasets(live)["ceval"]["data"]
        assert before["state"] == "missing"
        assert before["how"]["hub"]["repo_id"] == "ceval/ceval-exam"
        assert before["how"]["fetch_command"] == lbs_command("data fetch ceval", ROOT)
        assert before["how"]["downloads_allowed"] is True

        status, body = live.request("POST", "/api/jobs", CEVAL_LAW)  # accepted: fetched later
        assert status == 201, body
        job_id = body["data"]["job"]["id"]
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = live.request("GET", f"/api/jobs/{job_id}")[1]["data"]["job"]
            if job["phase"] == "fetching data":
                seen.append(job["data_fetch"])
            if job["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.2)
        assert job["state"] == "succeeded", job["error"]
        law_files = {p: d for p, d in hub.repos["ceval/ceval-exam"].items()
                     if p.startswith("law/")}
        total = sum(len(d) for d in law_files.values())
        assert seen, "the job never showed the fetching data phase"
        assert all(s["bytes_total"] == total for s in seen)
        assert any(0 < s["bytes_done"] < total for s in seen), seen  # bytes grew mid-fetch
        done = job["data_fetch"]
        assert done["state"] == "done" and done["bytes_done"] == total and done["files"] == 3
        assert job["phase"] is None
        assert job["progress"] == {"done": 2, "total": 2}
        # only the subject asked for, each file once
        assert sorted(hub.file_gets()) == sorted(
            f"/datasets/ceval/ceval-exam/resolve/{hub.commit('ceval/ceval-exam')}/{p}"
            for p in law_files)

        after = _datasets(live)["ceval"]["data"]
        assert after["state"] == "ready" and after["source"] == "hub cache"
        assert str(tmp_path / "hf") in after["where"]
        deadline = time.monotonic() + 10  # items are counted in the background
        while any(p["items"] is None for p in after["parts"]) and time.monotonic() < deadline:
            time.sleep(0.2)
            after = _datasets(live)["ceval"]["data"]
        assert {(p["part"], p["split"]): p["items"] for p in after["parts"]} == {
            ("law", "dev"): 1, ("law", "val"): 2, ("law", "test"): 2}

        # a second job reads the cache: no file is downloaded again
        gets = len(hub.file_gets())
        second = live.request("POST", "/api/jobs", CEVAL_LAW)[1]["data"]["job"]["id"]
        second = live.wait_for(second, ("succeeded", "failed"))
        assert second["state"] == "succeeded", second["error"]
        assert second["data_fetch"] is None and len(hub.file_gets()) == gets
        assert second["scores"] == job["scores"]
    finally:
        live.stop()

    # offline, with the hub gone: the cache still serves the job
    hub.stop()
    offline = LiveServer(with_tiny, {**env, "HF_HUB_OFFLINE": "1",
                                     "LBS_ALLOW_DATA_DOWNLOAD": "1"}).start()
    try:
        status, body = offline.request("POST", "/api/jobs", CEVAL_LAW)
        assert status == 201, body
        third = offline.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"))
        assert third["state"] == "succeeded", third["error"]
        assert third["scores"] == job["scores"]
        # a dataset that is not cached: offline, the 422 says so, with the guidance
        status, body = offline.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "gsm8k", "params": {}})
        assert status == 422 and body["error"]["code"] == "data_missing"
        assert "HF_HUB_OFFLINE" in body["error"]["message"]
        assert body["error"]["guidance"]["downloads_allowed"] is False
    finally:
        offline.stop()


def test_missing_data_422_and_status_say_how_to_get_it(with_tiny, hub, tmp_path):
    datasets_dir = tmp_path / "ds"
    (datasets_dir / "gsm8k").mkdir(parents=True)
    for name in ("test.jsonl", "train.jsonl"):
        shutil.copy(ROOT / "tests" / "fixtures" / "gsm8k" / name, datasets_dir / "gsm8k")
    live = LiveServer(with_tiny, _env(hub, tmp_path, LBS_DATASETS_DIR=str(datasets_dir))).start()
    try:
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "longbench_v2", "params": {}})
        assert status == 422, body
        err = body["error"]
        assert err["code"] == "data_missing"
        assert err["details"][0]["field"] == "params.data_dir"
        for text in ("THUDM/LongBench-v2", lbs_command("data fetch longbench_v2", ROOT),
                     str(datasets_dir / "longbench_v2"), "LBS_ALLOW_DATA_DOWNLOAD=1"):
            assert text in err["message"], text
        assert err["guidance"] == _datasets(live)["longbench_v2"]["data"]["how"]
        assert err["guidance"]["copy_to"] == str(datasets_dir / "longbench_v2")
        assert err["guidance"]["downloads_allowed"] is False

        # the fetch button's endpoint is refused while downloads are off
        status, body = live.request("POST", "/api/datasets/longbench_v2/fetch", {})
        assert status == 403 and body["error"]["code"] == "downloads_disabled"

        # a local folder in the official layout wins, and is counted
        gsm = _datasets(live)["gsm8k"]["data"]
        deadline = time.monotonic() + 10
        while gsm["items"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
            gsm = _datasets(live)["gsm8k"]["data"]
        assert gsm["state"] == "ready" and gsm["source"] == "folder"
        assert gsm["where"] == str(datasets_dir / "gsm8k") and gsm["items"] == 3  # test, not train
        assert _datasets(live)["needle_in_haystack"]["data"]["source"] == "bundled"
        assert not hub.requests  # nothing asked the hub
    finally:
        live.stop()


def test_fetch_button_endpoint_and_cli(with_tiny, hub, tmp_path):
    env = _env(hub, tmp_path, LBS_ALLOW_DATA_DOWNLOAD="1")
    live = LiveServer(with_tiny, env).start()
    try:
        status, body = live.request("POST", "/api/datasets/gsm8k/fetch", {})
        assert status == 202, body
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            data = _datasets(live)["gsm8k"]["data"]
            if data.get("fetch", {}).get("state") in ("done", "failed"):
                break
            time.sleep(0.3)
        assert data["fetch"]["state"] == "done", data
        main = [d for p, d in hub.repos["openai/gsm8k"].items() if p.startswith("main/")]
        assert data["fetch"]["bytes_done"] == sum(len(d) for d in main)
        assert data["state"] == "ready" and data["source"] == "hub cache"
        assert not any("socratic" in g for g in hub.file_gets())  # the main config only
        status, body = live.request("POST", "/api/datasets/gsm8k/fetch",
                                    {"subsets": ["nonsense"]})
        assert status == 422
    finally:
        live.stop()

    # the CLI: LongBench's data.zip is fetched and unpacked; a job then reads it offline
    cli_env = {**live.env, **env}
    out = subprocess.run([sys.executable, "-m", "backend.apps.cli", "data", "fetch", "longbench"],
                         cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fetching data" in out.stderr and "THUDM/LongBench" in out.stderr
    assert "hotpotqa" in out.stdout and "2 items" in out.stdout
    result = tmp_path / "lb.json"
    out = subprocess.run(
        [sys.executable, "-m", "backend.apps.cli", "eval", "--model", "builtin:tiny",
         "--dataset", "longbench", "--param", 'subsets=["trec"]', "--param", "max_length=300",
         "--output", str(result), "--quiet"],
        cwd=ROOT, env={**cli_env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=300)
    assert out.returncode == 0, out.stderr
    assert "overall score" in out.stdout


def test_fetch_without_a_network_says_to_copy_the_files(data_dir, tmp_path):
    """`data fetch` where the hub cannot be reached says so in words and where to copy
    the files, as the API's 422 does (not huggingface_hub's "DryRunError: Dry run
    cannot be performed…")."""
    import os

    from tests.conftest import free_port

    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "LBS_DATASETS_DIR": str(tmp_path / "ds")}
    out = subprocess.run([sys.executable, "-m", "backend.apps.cli", "data", "fetch", "gsm8k"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "DryRunError" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "cannot reach the Hugging Face Hub" in out.stderr and "openai/gsm8k" in out.stderr
    assert f"copy the repository's files into {tmp_path / 'ds' / 'gsm8k'}" in out.stderr
