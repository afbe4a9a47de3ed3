"""A job's own memory: the RAM its model and its work take, whatever ran before it in the
same worker, beside the worker process's peak (which carries every earlier job's leftovers:
libraries imported, models kept warm, heap the allocator kept)."""

from __future__ import annotations

import csv
import io

from backend.queue import jobs
from tests.conftest import queue_on

MiB = 2**20
NIAH = ("builtin:tiny", "needle_in_haystack",
        {"context_lengths": [256, 384], "depth_percents": [0, 50, 100], "max_new_tokens": 4})
ECHO_SMALL = ("builtin:small", "echo", {})  # cached: builtin:small (~45 MB) stays in RAM

TOLERANCE = 16 * MiB
"""How far two runs of one small job may differ in their own peak: well under the weights
an earlier job leaves in the worker (builtin:small's), which the process peak carries."""


def _run(worker, client, job: tuple[str, str, dict]) -> dict:
    (new,) = worker.queue.submit([jobs.NewJob(*job)])
    assert worker.run_once()
    answer = client.get(f"/api/jobs/{new.id}")
    body = answer.get_json()
    assert answer.status_code == 200 and body["data"]["job"]["state"] == "succeeded", body
    return body["data"]["job"]


def test_a_jobs_own_memory_does_not_depend_on_what_ran_before(
        client, settings, echo_plugin_dir, monkeypatch):
    """A small NIAH job reads the same own peak first in its worker and after a larger
    job that left builtin:small warm in RAM, while its process peak grows by those
    weights; a warm model's weights count to the job as a cold load's do; the leaderboard
    and the CSV export show the job's own figures."""
    from backend.apps.worker import Worker
    from backend.common.config import load_settings

    monkeypatch.setenv("LBS_PLUGIN_DIRS", str(echo_plugin_dir))
    worker = Worker(load_settings(), worker_id="w")
    worker.start()
    try:
        first = _run(worker, client, NIAH)
        cold = _run(worker, client, ECHO_SMALL)
        warm = _run(worker, client, ECHO_SMALL)  # builtin:small is still loaded
        after = _run(worker, client, NIAH)
        held = [m["model_name"] for m in worker.manager.status()["models"]]
    finally:
        worker.stop()
        worker.manager.stop_monitor()

    weights = next(e["bytes"] for e in cold["events"] if e["kind"] == "load")
    assert weights > 30 * MiB
    mem = {name: job["memory"] for name, job in
           [("first", first), ("cold", cold), ("warm", warm), ("after", after)]}
    # the worker still holds what ran before (builtin:small's weights, in RAM while the
    # last job ran; whether that shows in the process's RSS depends on what freed memory
    # its allocator kept resident from earlier work in the same process)
    assert any("small" in str(name) for name in held), held
    # the job's own peak does not
    assert abs(mem["after"]["rss_own_peak_bytes"] - mem["first"]["rss_own_peak_bytes"]) \
        < TOLERANCE, mem
    # a model already loaded counts as if the job had loaded it; a cold load's own
    # peak also holds the load's passing buffers (how much depends on the allocator's
    # state in the process, so only the weights are asserted for both)
    assert mem["warm"]["rss_own_peak_bytes"] >= weights, mem
    assert mem["cold"]["rss_own_peak_bytes"] >= weights, mem
    for m in mem.values():  # own = process peak above the worker's baseline
        assert m["rss_own_peak_bytes"] == m["rss_peak_bytes"] - m["rss_baseline_bytes"]
        assert abs(m["rss_own_peak_mb"] - m["rss_own_peak_bytes"] / MiB) < 0.01

    board = client.get("/api/leaderboard").get_json()["data"]["rows"]
    niah = next(r for r in board if r["benchmark"] == "needle_in_haystack")
    assert niah["job_id"] == after["id"] and niah["peak_kind"] == "rss"
    assert niah["peak_bytes"] == mem["after"]["rss_own_peak_bytes"]
    assert niah["process_peak_bytes"] == mem["after"]["rss_peak_bytes"]

    text = client.get(f"/api/jobs/{after['id']}/export?format=csv").get_data(as_text=True)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and all(float(r["peak_own_rss_mb"]) < float(r["peak_rss_mb"]) for r in rows)
    baseline_mb = mem["after"]["rss_baseline_bytes"] / MiB
    for r in rows:  # each sample's own peak is above the same baseline
        assert abs(float(r["peak_rss_mb"]) - float(r["peak_own_rss_mb"]) - baseline_mb) < 0.2


def test_jobs_from_before_the_own_figure_show_the_process_peak(data_dir, monkeypatch):
    """A database from before the migration keeps its samples (no own figure: None) and
    its jobs stay on the leaderboard with the process's peak, which is all they have."""
    import sqlalchemy as sa

    from backend.datasets.base import ScoreEntry
    from backend.queue import db, migrations
    from backend.queue.db import JobState, dispose_engines, session_factory
    from backend.queue.results import Results

    url = f"sqlite:///{data_dir / 'old.sqlite3'}"
    before = migrations.MIGRATIONS.index(migrations._m012_own_memory)
    with monkeypatch.context() as m:  # the schema before the migration, a job run there
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:before])
        session_factory(url)
        with db.get_engine(url).begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO jobs (model, dataset, params, state, created_at, started_at, "
                "finished_at, attempts, cancel_requested, progress_done, events, priority, "
                "submitter, num_gpus) VALUES ('builtin:tiny', 'gsm8k', '{}', 'succeeded', "
                "'2026-01-01', '2026-01-01', '2026-01-01 00:00:05', 1, 0, 1, '[]', 0, 'a', 1)"))
            conn.execute(sa.text(
                "INSERT INTO samples (job_id, idx, prompt, prompt_tokens, prediction, score, "
                "latency_s, peak_rss_bytes, fields, created_at) VALUES "
                "(1, 0, 'p', 3, 'x', 1.0, 0.1, 734003200, '{}', '2026-01-01')"))
            conn.execute(sa.text("INSERT INTO memory_peaks (job_id, name, device, bytes) "
                                 "VALUES (1, 'rss_peak', 'cpu', 734003200)"))
        dispose_engines()
    factory = session_factory(url)  # migrates to the newest schema
    (sample,), _ = queue_on(factory).samples(1)
    assert sample.peak_own_rss_bytes is None and sample.peak_rss_bytes == 734003200
    (row,) = Results(factory).leaderboard(lambda _name: None)["rows"]
    assert (row["peak_bytes"], row["peak_kind"], row["process_peak_bytes"]) == \
        (734003200, "rss", 734003200)
    # a new job beside it stores its own figure
    (new,) = queue_on(factory).submit([jobs.NewJob("builtin:tiny", "gsm8k", {})])
    queue_on(factory).claim("w")
    queue_on(factory).record_sample(new.id, "w", dict(
        idx=0, prompt="p", prompt_tokens=3, prediction="x", score=1.0, latency_s=0.1,
        output_tokens=1, fields={}, peak_rss_bytes=5 * MiB, peak_own_rss_bytes=MiB,
        peak_gpu_bytes=None))
    queue_on(factory).finish(new.id, "w", JobState.SUCCEEDED,
                             scores=[ScoreEntry("overall", 1.0, 1)])
    (sample,), _ = queue_on(factory).samples(new.id)
    assert sample.peak_own_rss_bytes == MiB
    dispose_engines()
