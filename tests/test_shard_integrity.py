"""A data-parallel job never ends "succeeded" with samples missing: its shards are not
deleted on their own (409; the job is cancelled or deleted as a whole), and a job whose
shards all ended with fewer samples stored than it has fails, saying how many are
missing. A real worker runs the shards, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from backend.queue.db import Job, JobState, write_session
from backend.queue.jobs import NewJob
from tests.conftest import ENGINES, queue_on
from tests.test_data_parallel import GRID, NIAH, _drain, _shards


@pytest.mark.parametrize("db_url", ENGINES, indirect=True)
def test_a_shard_is_not_deleted_on_its_own(client, settings, factory, db_url):
    res = client.post("/api/jobs", json={"model": "builtin:tiny", "dataset": NIAH,
                                         "params": GRID, "data_parallel": 2})
    job_id = res.get_json()["data"]["job"]["id"]
    shard = _shards(factory, job_id)[1]
    res = client.delete(f"/api/jobs/{shard.id}")
    assert res.status_code == 409, res.get_json()
    message = res.get_json()["error"]["message"]
    assert f"shard of job {job_id}" in message, message
    assert len(_shards(factory, job_id)) == 2
    # the job as a whole goes, its shards with it
    assert client.delete(f"/api/jobs/{job_id}").status_code == 200
    with factory() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0


@pytest.mark.parametrize("db_url", ENGINES, indirect=True)
def test_a_job_with_samples_missing_fails_instead_of_succeeding(settings, factory, with_tiny,
                                                                 db_url):
    (job,) = queue_on(factory).submit([NewJob("builtin:tiny", NIAH, GRID, data_parallel=2)])
    with write_session(factory) as session:  # a shard's row lost (deleted by hand, say)
        session.delete(session.get(Job, _shards(factory, job.id)[1].id))
    _drain(settings, ["w1"])
    ended = queue_on(factory).get(job.id)
    assert ended.state == JobState.FAILED.value, (ended.state, ended.progress_done)
    assert ended.progress_done == 5 and ended.progress_total == 10
    assert "5 of 10 samples" in ended.error, ended.error
