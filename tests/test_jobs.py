"""The queue: atomic claims, leases, resume after a lost worker, cancel, delete
(the queue tests on SQLite and on PostgreSQL)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from backend.apps.worker import Worker
from backend.queue import jobs
from backend.queue.db import Job, JobState, Sample, Score
from tests.conftest import ENGINES, queue_on

both_engines = pytest.mark.parametrize("db_url", ENGINES, indirect=True)

NIAH = "needle_in_haystack"
SMALL = {"context_lengths": [256, 384], "depth_percents": [0, 50, 100], "max_new_tokens": 4}


def _submit(factory, n=1, params=None, model="builtin:tiny"):
    new = [jobs.NewJob(model, NIAH, params or SMALL) for _ in range(n)]
    return [j.id for j in queue_on(factory).submit(new)]


@contextmanager
def started_worker(settings, worker_id: str):
    """A worker with its heartbeat, control thread and idle monitor, stopped afterwards."""
    worker = Worker(settings, worker_id=worker_id)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        worker.manager.stop_monitor()


def _claim_all(url: str, worker_id: str, start, out: mp.Queue) -> None:
    from backend.queue.db import JobState, session_factory

    factory = session_factory(url)
    start.wait()  # both processes are ready: race from here
    claimed = []
    while True:
        job = queue_on(factory).claim(worker_id)
        if job is None:
            break
        claimed.append(job.id)
        time.sleep(0.005)  # "run" it: real workers spend seconds between claims
        queue_on(factory).finish(job.id, worker_id, JobState.SUCCEEDED)
    out.put((worker_id, claimed))


@both_engines
def test_two_worker_processes_never_claim_the_same_job(settings, factory):
    ids = _submit(factory, 150)
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_claim_all,
                         args=(settings.database_url, f"w{i}", start, out))
             for i in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    claimed = results["w0"] + results["w1"]
    assert sorted(claimed) == ids, "every job claimed exactly once"
    assert results["w0"] and results["w1"], "both workers got work"
    with factory() as s:
        assert s.scalar(sa.select(sa.func.max(Job.attempts))) == 1


@both_engines
def test_claim_takes_oldest_first(factory):
    first, second = _submit(factory, 2)
    assert queue_on(factory).claim("w").id == first
    assert queue_on(factory).claim("w2").id == second
    assert queue_on(factory).claim("w3") is None


def _sample(idx: int, prediction: str) -> dict:
    return dict(idx=idx, prompt=f"p{idx}", prompt_tokens=1, prediction=prediction, score=0.0,
                latency_s=0.1, output_tokens=1, fields={"context_length": 256,
                                                        "depth_percent": 0.0})


@both_engines
def test_expired_lease_requeues_and_resumes_without_rerunning(settings, factory, with_tiny):
    (job_id,) = _submit(factory)
    lost = queue_on(factory, lease_seconds=0.3).claim("lost-worker")
    assert lost.id == job_id
    for idx in (0, 1):
        queue_on(factory, lease_seconds=0.3).record_sample(job_id, "lost-worker",
                                                           _sample(idx, "from the lost worker"))
    with factory() as s:
        before = {r.idx: (r.id, r.created_at) for r in s.scalars(sa.select(Sample))}
    time.sleep(0.5)  # the lost worker stops renewing; its lease expires

    with started_worker(settings, "rescuer") as worker:
        assert worker.run_once()

    job = queue_on(factory).get(job_id)
    assert job.state == JobState.SUCCEEDED.value, job.error
    assert job.attempts == 2
    assert any(e["kind"] == "lease_expired" for e in job.events)
    with factory() as s:
        rows = s.scalars(sa.select(Sample).order_by(Sample.idx)).all()
    assert [r.idx for r in rows] == list(range(6)), "one row per sample, none twice"
    for idx in (0, 1):  # stored samples were not run again
        assert rows[idx].prediction == "from the lost worker"
        assert (rows[idx].id, rows[idx].created_at) == before[idx]
    assert job.progress_done == 6 and job.progress_total == 6
    # The lost worker cannot write into a job it no longer holds.
    with pytest.raises(jobs.LeaseLost):
        queue_on(factory, 0.3).record_sample(job_id, "lost-worker", _sample(2, "late"))


@both_engines
def test_job_fails_after_max_attempts(factory):
    (job_id,) = _submit(factory)
    for attempt in range(1, 4):
        job = queue_on(factory, lease_seconds=0.05).claim(f"w{attempt}")
        assert job is not None and job.attempts == attempt
        time.sleep(0.1)
    assert queue_on(factory, lease_seconds=0.05).claim("w4") is None
    job = queue_on(factory).get(job_id)
    assert job.state == JobState.FAILED.value
    assert "gave up after 3 attempts" in job.error and "w3" in job.error


def test_cancel_stops_a_running_job(settings, factory, with_tiny):
    (job_id,) = _submit(factory, params={"context_lengths": [256, 512, 768, 1024],
                                         "depth_percents": {"count": 5}, "max_new_tokens": 8})
    worker = Worker(settings, worker_id="w")
    worker.start()
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while queue_on(factory).get(job_id).progress_done < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        queue_on(factory).cancel(job_id)
        thread.join(60)
    finally:
        worker.stop()
    job = queue_on(factory).get(job_id)
    assert job.state == JobState.CANCELLED.value
    assert 1 <= job.progress_done < 20
    with factory() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Sample)) == job.progress_done
        # scores of what did run are kept
        assert s.scalar(sa.select(Score.count).where(Score.name == "overall")) == job.progress_done


@both_engines
def test_cancel_and_delete_rules(factory):
    queued, running, other = _submit(factory, 3)
    assert queue_on(factory).claim("w").id == queued
    # queued -> cancelled at once
    assert queue_on(factory).cancel(running).state == JobState.CANCELLED.value
    with pytest.raises(jobs.JobConflict):
        queue_on(factory).cancel(running)
    # running: cancel is a request the worker honours between samples
    assert queue_on(factory).cancel(queued).cancel_requested
    with pytest.raises(jobs.JobConflict):
        queue_on(factory).delete(queued)
    queue_on(factory).delete(other)
    with pytest.raises(jobs.JobNotFound):
        queue_on(factory).get(other)
    with pytest.raises(jobs.JobNotFound):
        queue_on(factory).cancel(999)


def test_failed_job_records_reason_and_worker_survives(settings, factory, with_tiny):
    # A context length the tiny model cannot hold gets through submit-time checks only
    # if the model changes underneath; simulate with an unknown model name in the row.
    (bad,) = _submit(factory, model="builtin:nope")
    (good,) = _submit(factory, params={"context_lengths": [256], "depth_percents": [50],
                                       "max_new_tokens": 2})
    with started_worker(settings, "w") as worker:
        assert worker.run_once() and worker.run_once()
    assert queue_on(factory).get(bad).state == JobState.FAILED.value
    assert "builtin:nope" in queue_on(factory).get(bad).error
    assert queue_on(factory).get(good).state == JobState.SUCCEEDED.value


def _claim_order(factory, settings, monkeypatch, echo_plugin_dir, affinity: str):
    from backend.common.config import load_settings
    from backend.engine.plugins import load_plugins

    load_plugins([str(echo_plugin_dir)])
    monkeypatch.setenv("LBS_AFFINITY_SECONDS", affinity)
    monkeypatch.setenv("LBS_PLUGIN_DIRS", str(echo_plugin_dir))
    monkeypatch.setenv("MAX_MEMORY_USAGE", "2000000")  # room for one tiny model, not two
    return load_settings()


@pytest.mark.parametrize("affinity, expected_loads", [("300", 1), ("0", 2)])
def test_model_affinity_reuses_loaded_model(factory, settings, with_tiny, tiny_copy,
                                            echo_plugin_dir, monkeypatch, affinity,
                                            expected_loads):
    s = _claim_order(factory, settings, monkeypatch, echo_plugin_dir, affinity)
    a1, b, a2 = (queue_on(factory).submit([jobs.NewJob(m, "echo", {})])[0].id
                 for m in ("builtin:tiny", str(tiny_copy), "builtin:tiny"))
    with started_worker(s, "w") as worker:
        while worker.run_once():
            pass
    order = sorted((queue_on(factory).get(i).started_at, i) for i in (a1, b, a2))
    from backend.runners.models import resolve_model

    tiny = str(resolve_model("builtin:tiny", s).path.resolve())  # models are keyed by folder
    loads = sum(c for k, c in worker.manager.load_counts.items() if k[0] == tiny)
    if affinity == "0":
        assert [i for _, i in order] == [a1, b, a2]  # strict queue order
    else:
        assert [i for _, i in order] == [a1, a2, b]  # the loaded model's job first
    assert loads == expected_loads


def test_job_timeout_fails_the_job_and_keeps_its_samples(settings, factory, with_tiny):
    (job_id,) = [j.id for j in queue_on(factory).submit([jobs.NewJob(
        "builtin:tiny", NIAH, {"context_lengths": [256, 512, 768, 1024, 1280, 1536],
                               "depth_percents": {"count": 10}, "max_new_tokens": 16},
        timeout_s=3)])]  # the clock starts before the model loads; 60 samples take longer
    with started_worker(settings, "w") as worker:
        assert worker.run_once()
    job = queue_on(factory).get(job_id)
    assert job.state == JobState.FAILED.value
    assert "timed out" in job.error and "3 s" in job.error
    assert 1 <= job.progress_done < 60


@both_engines
def test_a_deleted_jobs_id_is_never_reused(factory):
    first, second, newest = _submit(factory, 3)
    queue_on(factory).delete(newest)  # the highest id: SQLite alone would hand it out again
    queue_on(factory).delete(second)
    (after,) = _submit(factory, 1)
    assert after == newest + 1
    queue_on(factory).delete(after)
    assert _submit(factory, 2) == [after + 1, after + 2]


def test_the_id_floor_starts_at_the_newest_job_of_an_old_database(data_dir, monkeypatch):
    """A database from before the floor: its highest job id is the floor."""
    import sqlalchemy as sa

    from backend.queue import migrations
    from backend.queue.db import Job, dispose_engines, get_engine, session_factory

    url = f"sqlite:///{data_dir / 'old.sqlite3'}"
    floor = migrations.MIGRATIONS.index(migrations._m009_id_floors)  # later ones follow it
    with monkeypatch.context() as m:  # the schema before the floor, and jobs written there
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:floor])
        with session_factory(url)() as session:
            old = [Job(model="builtin:tiny", dataset=NIAH, params=SMALL) for _ in range(2)]
            session.add_all(old)
            session.commit()
            ids = [job.id for job in old]
        with get_engine(url).begin() as conn:
            assert conn.execute(sa.text("SELECT MAX(version) FROM schema_version")
                                ).scalar() == floor
            conn.execute(sa.text("DELETE FROM jobs WHERE id = :i"), {"i": ids[-1]})
        dispose_engines()
    factory = session_factory(url)  # migrates again: the floor is the newest job there is
    assert _submit(factory, 1) == [ids[-1]]  # deleted before the floor: beyond recall
    queue_on(factory).delete(ids[-1])
    assert _submit(factory, 1) == [ids[-1] + 1]
    dispose_engines()


def test_a_late_lease_loss_of_the_last_job_does_not_cancel_the_next(settings, factory):
    """The heartbeat read job 3, job 3 finished and job 4 started, then renewing job 3's
    lease failed (LeaseLost): that must not stop job 4 (it was cancelled, seen live)."""
    from backend.apps.worker import Worker

    first, second = _submit(factory, 2)
    worker = Worker(settings, worker_id="w-late")
    assert queue_on(factory).claim("w-late").id == first
    queue_on(factory).finish(first, "w-late", JobState.SUCCEEDED)
    assert queue_on(factory).claim("w-late").id == second
    worker.start_job_watch(second)
    worker.renew(first)  # the heartbeat's renewal of the job it read before the switch
    assert not worker.cancel_seen.is_set()
    queue_on(factory).cancel(second)  # a real cancel of the running job is still seen
    worker.renew(second)
    assert worker.cancel_seen.is_set()
    worker.manager.stop_monitor()


@both_engines
def test_a_worker_prunes_long_dead_workers_their_status_and_old_commands(settings, factory):
    """Rows of workers gone for weeks, their status, and commands answered or expired
    weeks ago are deleted by the running workers' heartbeat; recent ones stay."""
    from datetime import timedelta

    from backend.queue.db import (
        CommandState,
        ControlCommand,
        WorkerRow,
        WorkerState,
        WorkerStatus,
        utcnow,
    )

    now = utcnow()
    weeks, hours = now - timedelta(days=30), now - timedelta(hours=1)
    with factory.begin() as session:
        for worker_id, beat, state in (("gone", weeks, WorkerState.LOST),
                                       ("stopped-long-ago", weeks, WorkerState.STOPPED),
                                       ("stopped-recently", hours, WorkerState.STOPPED)):
            session.add(WorkerRow(id=worker_id, host="h", pid=1, device="cpu",
                                  state=state.value, started_at=beat, heartbeat_at=beat))
            session.add(WorkerStatus(worker_id=worker_id, status={}, updated_at=beat))
        session.add(WorkerStatus(worker_id="never-registered", status={}, updated_at=weeks))
        for worker_id, state, created, done in (
                ("stopped-recently", CommandState.DONE, weeks, weeks),
                ("stopped-recently", CommandState.FAILED, weeks, None),  # timed out
                ("gone", CommandState.PENDING, weeks, None),  # nobody waits for it now
                ("stopped-recently", CommandState.DONE, hours, hours)):
            session.add(ControlCommand(worker_id=worker_id, command="offload", args={},
                                       state=state.value, created_at=created, done_at=done))

    def rows():
        with factory() as session:
            return (set(session.scalars(sa.select(WorkerRow.id))),
                    set(session.scalars(sa.select(WorkerStatus.worker_id))),
                    sorted(session.scalars(sa.select(ControlCommand.created_at))))

    with started_worker(settings, "w-prune"):
        deadline = time.monotonic() + 30
        while "gone" in rows()[0] and time.monotonic() < deadline:
            time.sleep(0.2)
        workers, statuses, commands = rows()
    assert workers == {"stopped-recently", "w-prune"}
    assert statuses <= {"stopped-recently", "w-prune"} and "stopped-recently" in statuses
    assert commands == [hours]


def test_a_worker_whose_row_was_pruned_while_it_slept_registers_again(settings, factory):
    """A suspended machine wakes after the retention: another worker pruned this one's
    rows, and its next heartbeat brings them back instead of beating into nothing."""
    from backend.queue.db import WorkerRow, WorkerStatus

    with started_worker(settings, "w-sleeper"):
        with factory.begin() as session:
            session.execute(sa.delete(WorkerStatus).where(WorkerStatus.worker_id == "w-sleeper"))
            session.execute(sa.delete(WorkerRow).where(WorkerRow.id == "w-sleeper"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with factory() as session:
                row = session.get(WorkerRow, "w-sleeper")
                status = session.get(WorkerStatus, "w-sleeper")
            if row is not None and status is not None:
                break
            time.sleep(0.2)
    assert row is not None and row.state == "idle" and status is not None
    assert [w.id for w in queue_on(factory).workers.all()] == ["w-sleeper"]
