"""lm-eval tasks as a newcomer meets them: the dataset list stays small and tasks are
searched on their own endpoint, each saying whether its data is here; a job whose data
is missing is refused at submission with the command that gets it, and after that
command it runs offline; relative data files are read from the YAML's folder; the
bundled example task runs out of the box."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, LiveServer
from tests.hub_server import FakeHub, official_repos
from tests.test_lm_eval import _task_list

pytestmark = pytest.mark.slow

GSM8K_README = b"""---
license: mit
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
GSM8K
"""
"""The hub README's `configs` block, which tells `datasets` the configurations."""

GSM8K_JOB = {"model": "builtin:tiny", "dataset": "lm_eval",
             "params": {"tasks": ["gsm8k"], "num_fewshot": 0, "limit": 2,
                        "gen_kwargs": {"max_gen_toks": 4}}}


@pytest.fixture
def hub():
    repo = {**official_repos()["openai/gsm8k"], "README.md": GSM8K_README}
    server = FakeHub({"openai/gsm8k": repo}).start()
    yield server
    server.stop()


def test_dataset_list_is_small_and_tasks_are_searched(with_tiny, tasks_dir):
    live = LiveServer(with_tiny, {"LBS_LM_EVAL_INCLUDE_PATH": str(tasks_dir)}).start()
    try:
        found = _task_list(live, q="arc easy", limit=5)
        assert found["total"] > 5 and len(found["tasks"]) == 5
        first = found["tasks"][0]
        assert first["name"] == "arc_easy"
        how = first["data"].pop("how")
        assert first["data"] == {"state": "missing", "source": "hub", "hub": "allenai/ai2_arc",
                                 "config": "ARC-Easy"}
        assert how["downloads_allowed"] is False
        assert how["fetch_command"].endswith("data fetch lm_eval --tasks arc_easy")
        group = _task_list(live, group="lbs_group")
        assert {t["name"] for t in group["tasks"]} == {"lbs_mc", "lbs_gen"}
        assert all(t["data"]["state"] == "ready" for t in group["tasks"])
        (row,) = _task_list(live, names="lbs_group")["tasks"]
        assert row["runs"] == {"count": 2, "tasks": ["lbs_mc", "lbs_gen"]}
        tag = _task_list(live, kind="tag", q="ai2_arc")["tasks"][0]
        assert tag["name"] == "ai2_arc" and tag["runs"]["count"] == 2
        page2 = _task_list(live, q="arc", offset=5, limit=5)["tasks"]
        assert [t["name"] for t in page2] != [t["name"] for t in found["tasks"]]

        status, body = live.request("GET", "/api/lm_eval/tasks?limit=0")
        assert status == 422 and body["error"]["details"][0]["field"] == "limit"
        status, body = live.request("GET", "/api/lm_eval/tasks?kind=bogus")
        assert status == 422 and body["error"]["details"][0]["field"] == "kind"

        status, body = live.request("GET", "/api/datasets")
        size = len(json.dumps(body))
        assert size < 100_000, f"GET /api/datasets is {size} bytes"
        (lm,) = [d for d in body["data"]["datasets"] if d["name"] == "lm_eval"]
        assert lm["tasks"]["status"] == "ready" and lm["tasks"]["count"] > 10_000
        assert lm["data"]["state"] == "per_task"
    finally:
        live.stop()


def test_missing_hub_data_is_refused_then_fetched_then_runs_offline(with_tiny, hub,
                                                                    tmp_path):
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    live = LiveServer(with_tiny, env).start()
    try:
        _task_list(live, limit=1)
        status, body = live.request("POST", "/api/jobs", GSM8K_JOB)
        assert status == 422, body
        (detail,) = body["error"]["details"]
        assert detail["field"] == "params.tasks"
        for words in ("gsm8k", "openai/gsm8k", "main",
                      "data fetch lm_eval --tasks gsm8k",
                      "HF_HUB_OFFLINE"):
            assert words in detail["message"], detail["message"]
        assert live.request("GET", "/api/jobs")[1]["data"]["jobs"] == []

        # on a machine with a network (here: the loopback hub), the command gets it
        fetch = subprocess.run(
            [sys.executable, "-m", "backend.apps.cli", "data", "fetch", "lm_eval",
             "--tasks", "gsm8k"], cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, **live.env, "HF_HUB_OFFLINE": "0",
                 "HF_DATASETS_OFFLINE": "0"})
        assert fetch.returncode == 0, fetch.stderr[-2000:]
        assert "1 of 1 task(s) fetched" in fetch.stdout
        assert any(r["path"].startswith("/datasets/openai/gsm8k") for r in hub.requests)

        (row,) = _task_list(live, names="gsm8k")["tasks"]
        assert row["data"]["state"] == "ready", row
        status, body = live.request("POST", "/api/jobs", GSM8K_JOB)  # offline, from cache
        assert status == 201, body
        job = live.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"), timeout=300)
        assert job["state"] == "succeeded", job["error"]
        assert job["progress"] == {"done": 2, "total": 2}
    finally:
        live.stop()


def test_relative_data_files_and_the_bundled_example(with_tiny, tmp_path):
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "my_mc.jsonl").write_text("".join(
        json.dumps({"question": f"q{i}?", "choices": ["a", "b"], "label": i % 2}) + "\n"
        for i in range(3)))
    yaml = (ROOT / "tests" / "fixtures" / "lm_eval" / "lbs_mc.yaml").read_text()
    (folder / "my_mc.yaml").write_text(
        yaml.replace("task: lbs_mc", "task: my_mc").replace("mc.jsonl", "my_mc.jsonl"))
    (folder / "gone.yaml").write_text(
        yaml.replace("task: lbs_mc", "task: gone_mc").replace("mc.jsonl", "gone.jsonl"))
    live = LiveServer(with_tiny, {"LBS_LM_EVAL_INCLUDE_PATH": str(folder)}).start()
    try:
        (mine,) = _task_list(live, names="my_mc")["tasks"]
        assert mine["data"]["where"] == str(folder / "my_mc.jsonl")  # not the server's cwd
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "lm_eval", "params": {"tasks": ["gone_mc"]}})
        assert status == 422 and "gone.jsonl" in body["error"]["details"][0]["message"]
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "lm_eval",
            "params": {"tasks": ["my_mc", "lbs_example_mc"]}})
        assert status == 201, body
        job = live.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"), timeout=300)
        assert job["state"] == "succeeded", job["error"]
        assert job["progress"]["total"] == 3 + 12  # 3 of ours, the example's 12
    finally:
        live.stop()

    # the README's example, as a newcomer types it: no include path, no download
    out = subprocess.run([sys.executable, "-m", "backend.apps.cli", "eval", "--model",
                          "builtin:tiny", "--dataset", "lm_eval", "--param",
                          'tasks=["lbs_example_mc"]'],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lbs_example_mc" in out.stdout
