"""A job cancelled while its data loads ends `cancelled`, not `failed`, whatever the
interrupted load then raises; and once the load returns, a cancelled job answers
nothing more. lm-eval's task loading (seconds to minutes) is the case; a real worker."""

from __future__ import annotations

from backend.datasets.lm_eval_tasks import LmEvalTasks
from backend.queue.db import JobState
from backend.queue.jobs import NewJob
from tests.conftest import queue_on, work_one_job


def _cancelled_while_loading(monkeypatch, factory, then_raise: BaseException | None) -> int:
    """Queue an lm-eval job whose task loading is cancelled by the user half-way; the
    load then raises `then_raise` (None: it ends normally). Returns the job's id."""
    (job,) = queue_on(factory).submit([NewJob("builtin:tiny", "lm_eval",
                                              {"tasks": ["lbs_mc"]})])
    real = LmEvalTasks._load

    def load(self, params):
        loaded = real(self, params)
        queue_on(factory).cancel(job.id)  # the user cancels while the tasks load
        if then_raise is not None:
            raise then_raise
        return loaded

    monkeypatch.setattr(LmEvalTasks, "_load", load)
    return job.id


def test_a_load_that_fails_after_a_cancel_ends_cancelled(monkeypatch, tasks_dir, settings,
                                                         factory, with_tiny):
    job_id = _cancelled_while_loading(
        monkeypatch, factory, ConnectionError("the connection was closed while reading"))
    work_one_job(settings)
    job = queue_on(factory).get(job_id)
    assert job.state == JobState.CANCELLED.value, (job.state, job.error)


def test_a_load_that_ends_after_a_cancel_answers_nothing(monkeypatch, tasks_dir, settings,
                                                         factory, with_tiny):
    job_id = _cancelled_while_loading(monkeypatch, factory, None)
    work_one_job(settings)
    job = queue_on(factory).get(job_id)
    assert job.state == JobState.CANCELLED.value, (job.state, job.error)
    assert job.progress_done == 0
