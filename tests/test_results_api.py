"""Results across jobs through the API: the leaderboard (a model named by path and by
folder name is one model), memory against context length, the pre-launch estimate,
and exports that carry each sample's reference and the dataset's own columns."""

from __future__ import annotations

import csv
import io
import json

from backend.datasets.base import ScoreEntry
from backend.queue import jobs
from backend.queue.db import Job, JobState
from tests.conftest import queue_on

NIAH = {"model": "builtin:tiny", "dataset": "needle_in_haystack",
        "params": {"context_lengths": [256, 512], "depth_percents": [0, 50, 100]}}


def _finished(factory, model, dataset, samples, score, memory=(), worker="w"):
    """A succeeded job with `samples` [(prompt_tokens, fields, peak_rss, peak_gpu)]."""
    (job,) = queue_on(factory).submit([jobs.NewJob(model, dataset, {})])
    claimed = queue_on(factory).claim(worker)
    assert claimed.id == job.id
    for i, (tokens, fields, rss, gpu) in enumerate(samples):
        queue_on(factory).record_sample(job.id, worker, dict(
            idx=i, prompt="p", prompt_tokens=tokens, prediction="x", score=1.0,
            latency_s=0.1, output_tokens=4, fields=fields, peak_rss_bytes=rss,
            peak_gpu_bytes=gpu))
    queue_on(factory).finish(job.id, worker, JobState.SUCCEEDED,
                             scores=[ScoreEntry("overall", score, len(samples))],
                             memory=list(memory))
    return job.id


def test_leaderboard_merges_a_model_named_by_path_and_by_folder(client, app, tmp_path):
    factory = app.extensions["lbs"].queue.factory
    folder = tmp_path / "zoo" / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    old = _finished(factory, str(folder), "gsm8k", [(10, {}, 2**30, None)], 0.25,
                    [("rss_peak", "cpu", 3 * 2**30)])
    new = _finished(factory, "my-model", "gsm8k", [(10, {}, 2**30, None)] * 2, 0.5,
                    [("rss_peak", "cpu", 2**31)])
    gpu = _finished(factory, "builtin:tiny", "gsm8k", [(20, {}, 2**30, 2**29)], 0.75,
                    [("rss_peak", "cpu", 2**31), ("cuda_max_reserved", "cuda:0", 2**29),
                     ("cuda_max_reserved", "cuda:1", 2**29)])
    data = client.get("/api/leaderboard").get_json()["data"]
    rows = {r["model"]: r for r in data["rows"]}
    assert set(rows) == {"my-model", "builtin:tiny"}
    mine = rows["my-model"]
    assert mine["job_id"] == new and mine["score"] == 0.5 and mine["runs"] == 2
    assert set(mine["names"]) == {"my-model", str(folder)} and old != new
    assert mine["peak_bytes"] == 2**31 and mine["peak_kind"] == "rss"
    assert mine["tokens_per_s"] is not None and mine["tokens_per_s"] > 0
    tiny = rows["builtin:tiny"]
    assert tiny["job_id"] == gpu and tiny["peak_kind"] == "gpu" and tiny["peak_bytes"] == 2**30


def test_memory_by_context_length(client, app):
    factory = app.extensions["lbs"].queue.factory
    _finished(factory, "builtin:tiny", "needle_in_haystack", [
        (260, {"context_length": 256}, 100, None), (262, {"context_length": 256}, 300, None),
        (515, {"context_length": 512}, 500, None)], 1.0)
    _finished(factory, "builtin:tiny", "longbench", [(900, {}, 10, 40), (400, {}, 20, 30)], 0.3)
    data = client.get("/api/leaderboard/memory").get_json()["data"]["datasets"]
    (niah,) = data["needle_in_haystack"]
    assert niah["kind"] == "rss" and niah["points"] == [[256, 300], [512, 500]]
    (lb,) = data["longbench"]
    assert lb["kind"] == "gpu" and lb["points"] == [[400, 30], [900, 40]]


def test_estimate_before_launch(client, app):
    res = client.post("/api/jobs/estimate", json=NIAH)
    assert res.status_code == 200, res.get_json()
    data = res.get_json()["data"]
    (job,) = data["jobs"]
    assert job["memory_bytes"] > 0
    assert job["duration"] == {"items": 6, "seconds_per_sample": None, "seconds": None,
                               "basis": None}  # nothing finished yet to go on
    assert data["workers"] == []  # none alive in this test
    factory = app.extensions["lbs"].queue.factory
    _finished(factory, "builtin:tiny", "needle_in_haystack",
              [(256, {"context_length": 256}, 1, None)] * 4, 1.0)
    job = client.post("/api/jobs/estimate", json=NIAH).get_json()["data"]["jobs"][0]
    assert job["duration"]["basis"] == "this model on this dataset"
    assert job["duration"]["seconds"] == round(job["duration"]["seconds_per_sample"] * 6, 1)
    # a bad field is refused as a submission would be, and nothing is queued
    res = client.post("/api/jobs/estimate", json={"jobs": [
        {**NIAH, "params": {"context_lengths": [64]}}]})
    assert res.status_code == 422
    assert res.get_json()["error"]["details"][0]["field"] == "jobs[0].params.context_lengths"
    assert client.get("/api/jobs?state=queued").get_json()["data"]["total"] == 0


def test_exports_carry_reference_and_dataset_columns(client, app):
    factory = app.extensions["lbs"].queue.factory
    fields = {"subject": "law", "category": "Humanities", "reference": "B", "extracted": "A",
              "why": "answered A, the reference is B", "logprobs": {"A": -0.5, "B": -1.5}}
    job_id = _finished(factory, "builtin:tiny", "ceval",
                       [(30, fields, 1, None)] * 3, 0.0)
    res = client.get(f"/api/jobs/{job_id}/export?format=csv")
    assert res.status_code == 200 and res.is_streamed
    rows = list(csv.DictReader(io.StringIO(res.get_data(as_text=True))))
    assert len(rows) == 3
    assert rows[0]["reference"] == "B" and rows[0]["extracted"] == "A"
    assert rows[0]["subject"] == "law" and rows[0]["category"] == "Humanities"
    assert json.loads(rows[0]["logprobs"]) == {"A": -0.5, "B": -1.5}
    # only the columns this dataset has: no Needle-in-a-Haystack cells, empty on every row
    assert "context_length" not in rows[0] and "depth_percent" not in rows[0]
    assert list(rows[0])[:3] == ["idx", "subject", "category"]
    res = client.get(f"/api/jobs/{job_id}/export")
    assert res.is_streamed
    body = json.loads(res.get_data(as_text=True))
    assert body["job"]["id"] == job_id and len(body["samples"]) == 3
    assert body["samples"][2]["fields"]["why"] == "answered A, the reference is B"


def test_export_of_many_samples_reads_them_in_pages(client, app, monkeypatch):
    from backend.apps.api import jobs as api_jobs

    monkeypatch.setattr(api_jobs, "EXPORT_PAGE", 2)
    factory = app.extensions["lbs"].queue.factory
    job_id = _finished(factory, "builtin:tiny", "gsm8k",
                       [(5, {"reference": str(i)}, 1, None) for i in range(5)], 0.0)
    body = json.loads(client.get(f"/api/jobs/{job_id}/export").get_data(as_text=True))
    assert [s["fields"]["reference"] for s in body["samples"]] == ["0", "1", "2", "3", "4"]
    rows = list(csv.DictReader(io.StringIO(
        client.get(f"/api/jobs/{job_id}/export?format=csv").get_data(as_text=True))))
    assert [r["idx"] for r in rows] == ["0", "1", "2", "3", "4"]


def test_datasets_list_their_breakdowns(client):
    data = client.get("/api/datasets").get_json()["data"]["datasets"]
    ceval = next(d for d in data if d["name"] == "ceval")
    assert [b["key"] for b in ceval["breakdowns"]] == ["averages", "categories", "subjects"]
    assert {"key": "subject", "title": "Subject", "filter": True} in ceval["sample_columns"]


def _run(factory, model, dataset, params, scores, entries=None, worker="w"):
    """A succeeded job of `dataset` with `params`, one sample per 0-1 score, scored by
    the dataset's own aggregate unless `entries` are given."""
    from backend.datasets.registry import get_dataset

    (job,) = queue_on(factory).submit([jobs.NewJob(model, dataset, params)])
    assert queue_on(factory).claim(worker).id == job.id
    for i, score in enumerate(scores):
        queue_on(factory).record_sample(job.id, worker, dict(
            idx=i, prompt=f"question {i}", prompt_tokens=10, prediction="x", score=score,
            latency_s=0.1, output_tokens=4, fields={}))
    if entries is None:
        entries = get_dataset(dataset).aggregate([({}, s) for s in scores])
    queue_on(factory).finish(job.id, worker, JobState.SUCCEEDED, scores=entries)
    return job.id


def test_leaderboard_tells_runs_on_other_data_or_weights_apart(client, app):
    """What only the run knows (its manifest: the data files' hash, the weights'
    fingerprint) is part of a row's identity too."""
    factory = app.extensions["lbs"].queue.factory
    ids = [_run(factory, "builtin:tiny", "gsm8k", {}, [1.0, 0.0]) for _ in range(4)]

    def manifest(data: str, weights: str) -> dict:
        return {"task": {"data": {"sha256": data * 64}, "prompt_code_sha256": "c" * 64},
                "model": {"weights_sha256": weights * 64}}
    for job_id, (data, weights) in zip(ids, ("aa", "ab", "ba", "aa"), strict=True):
        with factory() as session:  # as the worker records it once the model loaded
            session.get(Job, job_id).manifest = manifest(data, weights)
            session.commit()
    rows = client.get("/api/leaderboard").get_json()["data"]["rows"]
    by_job = {r["job_id"]: r for r in rows}
    # runs 1 and 4: same data and weights, one row; run 2 other weights; run 3 other data
    assert set(by_job) == {ids[3], ids[1], ids[2]} and by_job[ids[3]]["runs"] == 2
    assert by_job[ids[1]]["model_key"] != by_job[ids[3]]["model_key"]
    assert by_job[ids[2]]["distinct"] == {"data_sha256": "b" * 16}
    assert by_job[ids[3]]["distinct"] == {"data_sha256": "a" * 16}


def _lm_eval_entries(acc: float) -> list[ScoreEntry]:
    """What the lm_eval dataset stores: overall, then a metric row per task/group metric."""
    def metric(task, kind, name, value, stderr):
        return ScoreEntry("metric", value, 40, {
            "task": task, "kind": kind, "metric": name, "filter": "none", "stderr": stderr,
            "n_shot": 0, "version": 1.0}, stderr, (value - 0.1, value + 0.1))
    return [ScoreEntry("overall", acc, 80),
            metric("arc_easy", "task", "acc", acc, 0.05),
            metric("arc_easy", "task", "acc_norm", acc - 0.1, 0.04),
            metric("lbs_mc", "task", "acc", 0.5, 0.08)]


def test_leaderboard_rows_are_configurations_and_lm_eval_tasks(client, app):
    factory = app.extensions["lbs"].queue.factory
    full = _run(factory, "builtin:tiny", "gsm8k", {}, [1.0, 0.0, 1.0, 1.0])
    few = _run(factory, "builtin:tiny", "gsm8k", {"split": "train", "max_samples": 2},
               [0.0, 0.0])
    # the same configuration again, batched: one row, two runs that disagree
    again = _run(factory, "builtin:tiny", "gsm8k", {"batch_size": 4}, [1.0, 0.0, 0.0, 1.0])
    _run(factory, "builtin:tiny", "lm_eval", {"tasks": ["arc_easy", "lbs_mc"]}, [1.0] * 4,
         _lm_eval_entries(0.7))
    rows = client.get("/api/leaderboard").get_json()["data"]["rows"]
    gsm = {r["job_id"]: r for r in rows if r["benchmark"] == "gsm8k"}
    assert set(gsm) == {again, few}  # the 2-question job did not replace the test split
    test_split, two = gsm[again], gsm[few]
    assert test_split["runs"] == 2 and test_split["runs_agree"] == 1
    assert test_split["run_spread"] == [0.5, 0.75] and full != again
    assert test_split["distinct"] == {"max_samples": None, "split": "test"}
    assert two["distinct"] == {"max_samples": 2, "split": "train"} and two["runs"] == 1
    assert two["few_items"] is True and two["score_stderr"] == 0.0
    tasks = {r["benchmark"]: r for r in rows if r["dataset"] == "lm_eval"}
    assert set(tasks) == {"lm_eval:arc_easy", "lm_eval:lbs_mc"}
    arc = tasks["lm_eval:arc_easy"]
    assert (arc["metric"], arc["score"], arc["score_stderr"]) == ("acc", 0.7, 0.05)
    assert [m["metric"] for m in arc["metrics"]] == ["acc", "acc_norm"]


def test_lm_eval_export_is_read_by_lm_eval(client, app):
    from lm_eval.utils import make_table

    factory = app.extensions["lbs"].queue.factory
    niah = _run(factory, "builtin:tiny", "gsm8k", {"shots": 2}, [1.0, 0.0, 1.0])
    task = _run(factory, "builtin:tiny", "lm_eval", {"tasks": ["arc_easy", "lbs_mc"]},
                [1.0] * 4, _lm_eval_entries(0.7))
    for job_id, names in ((niah, ["gsm8k"]), (task, ["arc_easy", "lbs_mc"])):
        res = client.get(f"/api/jobs/{job_id}/export?format=lm_eval")
        assert res.status_code == 200, res.get_json()
        assert res.headers["Content-Disposition"].endswith(".json")
        results = json.loads(res.data)
        for key in ("results", "groups", "configs", "versions", "n-shot", "n-samples"):
            assert key in results, key
        table = make_table(results)  # lm-eval's own reader of its results
        for name in names:
            assert name in table
    gsm = json.loads(client.get(f"/api/jobs/{niah}/export?format=lm_eval").data)
    entry = gsm["results"]["gsm8k"]
    assert entry["score,none"] == 2 / 3
    assert entry["score_stderr,none"] == (2 / 3 * 1 / 3 / 3) ** 0.5
    assert gsm["n-shot"]["gsm8k"] == 2 and gsm["n-samples"]["gsm8k"]["effective"] == 3
    arc = json.loads(client.get(f"/api/jobs/{task}/export?format=lm_eval").data)
    assert arc["results"]["arc_easy"]["acc,none"] == 0.7
    assert arc["results"]["arc_easy"]["acc_stderr,none"] == 0.05
    row = next(line for line in make_table(arc).splitlines() if "arc_easy" in line)
    cells = [c.strip() for c in row.split("|")]
    assert cells[5:10] == ["acc", "", "0.7", "±", "0.05"]  # the value and its stderr
    res = client.get(f"/api/jobs/{task}/export?format=lm-eval")
    assert res.status_code == 422 and "format" in res.get_json()["error"]["message"]


def test_memory_by_length_on_the_datasets_that_declare_a_length_axis(client, app, monkeypatch):
    """A dataset (a plugin's as a built-in one's) gets the memory-against-length chart by
    declaring its length axis; GET /api/datasets says what the axis is, for the page."""
    from backend.datasets import registry
    from backend.datasets.base import Dataset, LengthAxis

    class Spans(Dataset):
        name = "spans"
        description = "prompts of many lengths"
        length_axis = LengthAxis("prompt_tokens", series=False)

    monkeypatch.setitem(registry._registry._classes, "spans", Spans)
    factory = app.extensions["lbs"].queue.factory
    _finished(factory, "builtin:tiny", "spans", [(300, {}, 10, None), (100, {}, 20, None)], 0.5)
    _finished(factory, "builtin:tiny", "gsm8k", [(50, {}, 10, None)], 0.5)
    data = client.get("/api/leaderboard/memory").get_json()["data"]["datasets"]
    assert list(data) == ["needle_in_haystack", "longbench", "spans"]  # grids first
    (spans,) = data["spans"]
    assert spans["model"] == "builtin:tiny" and spans["points"] == [[100, 20], [300, 10]]
    axes = {d["name"]: d["length_axis"]
            for d in client.get("/api/datasets").get_json()["data"]["datasets"]}
    assert axes["needle_in_haystack"] == {"x": "context_length", "series": True}
    assert axes["longbench"] == {"x": "prompt_tokens", "series": False}
    assert axes["spans"] == {"x": "prompt_tokens", "series": False}
    assert axes["gsm8k"] is None
