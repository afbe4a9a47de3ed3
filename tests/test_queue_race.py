"""Worker processes racing on one queue, on SQLite and on PostgreSQL: every job runs
exactly once, and a job whose worker was killed mid-job resumes in another worker
after its stored samples. The processes claim and finish through backend.queue.jobs
(no model), so hundreds of jobs take seconds."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import sqlalchemy as sa

from backend.queue import jobs
from backend.queue.db import Job, JobState, Sample
from tests.conftest import ENGINES, queue_on

pytestmark = pytest.mark.parametrize("db_url", ENGINES, indirect=True)


def _drain(url: str, worker_id: str, start, out) -> None:
    from backend.queue.db import JobState, session_factory

    factory = session_factory(url)
    start.wait()
    claimed = []
    while (job := queue_on(factory).claim(worker_id)) is not None:
        claimed.append(job.id)
        queue_on(factory).record_sample(job.id, worker_id, _sample(0, worker_id))
        queue_on(factory).finish(job.id, worker_id, JobState.SUCCEEDED)
    out.put((worker_id, claimed))


def _sample(idx: int, prediction: str) -> dict:
    return dict(idx=idx, prompt=f"p{idx}", prompt_tokens=1, prediction=prediction,
                score=1.0, latency_s=0.0, output_tokens=1, fields={})


def test_worker_processes_race_on_hundreds_of_jobs(factory, settings):
    n_jobs, n_workers = 300, 4
    ids = [j.id for j in queue_on(factory).submit([
        jobs.NewJob("builtin:tiny", "echo", {}, submitter=f"user{i % 3}", priority=i % 2)
        for i in range(n_jobs)])]
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(n_workers)
    procs = [ctx.Process(target=_drain, args=(settings.database_url, f"w{i}", start, out))
             for i in range(n_workers)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(30)
    claimed = [job_id for got in results.values() for job_id in got]
    assert sorted(claimed) == ids, "every job claimed exactly once"
    assert sum(1 for got in results.values() if got) >= 2, "the work was shared"
    with factory() as s:
        assert s.scalar(sa.select(sa.func.max(Job.attempts))) == 1
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)
                        .where(Job.state == JobState.SUCCEEDED.value)) == n_jobs
        assert s.scalar(sa.select(sa.func.count()).select_from(Sample)) == n_jobs


def _run_until_killed(url: str, ready) -> None:
    """Claim the job, store samples 0-2, then hang (the test kills this process)."""
    from backend.queue.db import session_factory

    factory = session_factory(url)
    job = queue_on(factory, lease_seconds=1.0).claim("doomed")
    queue_on(factory).set_total(job.id, "doomed", 10)
    for idx in range(3):
        queue_on(factory, lease_seconds=1.0).record_sample(job.id, "doomed", _sample(idx, "doomed"))
    ready.set()
    time.sleep(600)


def _rescue(url: str, out) -> None:
    """Wait for the lost job to come back, resume it after its stored samples."""
    from backend.queue.db import JobState, session_factory

    factory = session_factory(url)
    deadline = time.monotonic() + 60
    while (job := queue_on(factory, lease_seconds=30).claim("rescuer")) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    done = queue_on(factory).stored_samples(job.id)
    for idx in range(10):
        if idx not in done:
            queue_on(factory, 30).record_sample(job.id, "rescuer", _sample(idx, "rescuer"))
    queue_on(factory).finish(job.id, "rescuer", JobState.SUCCEEDED)
    out.put((job.id, job.attempts, sorted(done)))


def test_killed_worker_job_resumes_in_another(factory, settings):
    (job_id,) = [j.id for j in queue_on(factory).submit([jobs.NewJob("m", "echo", {})])]
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    doomed = ctx.Process(target=_run_until_killed, args=(settings.database_url, ready))
    doomed.start()
    assert ready.wait(60)
    rescuer = ctx.Process(target=_rescue, args=(settings.database_url, out))
    rescuer.start()
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(10)
    assert out.get(timeout=90) == (job_id, 2, [0, 1, 2])
    rescuer.join(30)
    job = queue_on(factory).get(job_id)
    assert job.state == JobState.SUCCEEDED.value and job.attempts == 2
    assert any(e["kind"] == "lease_expired" and "doomed" in e["message"] for e in job.events)
    with factory() as s:
        rows = s.execute(sa.select(Sample.idx, Sample.prediction).order_by(Sample.idx)).all()
    assert [r.idx for r in rows] == list(range(10)), "one row per sample, none twice"
    assert [r.prediction for r in rows[:3]] == ["doomed"] * 3  # not run again
    assert job.progress_done == 10
