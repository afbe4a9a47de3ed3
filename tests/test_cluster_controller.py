"""The cluster controller's reading of the queue and its decisions, without a cluster
(tests/test_cluster_ray.py and test_cluster_slurm.py place real workers), and `lbs
cluster`'s arguments."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from backend.apps.cluster.cli import main as cluster_main
from backend.apps.cluster.controller import ScalePolicy, workers_to_start
from backend.queue import jobs
from backend.queue.cluster import ClusterBook, PoolLoad, PoolShape
from backend.queue.db import Job, JobState, utcnow, write_session
from tests.conftest import queue_on

SCALED = ScalePolicy(max_workers=4)


@pytest.mark.parametrize(("queued", "busy", "placed", "start"), [
    (0, 0, 0, 0),   # empty queue: nothing held, nothing asked for
    (3, 0, 0, 3),   # cold: one worker per queued job
    (3, 0, 3, 0),   # three starting: they will claim the three jobs
    (2, 2, 2, 2),   # two busy, two waiting: two more
    (9, 0, 0, 4),   # never beyond the maximum
    (1, 3, 4, 0),   # at the maximum
])
def test_workers_to_start_follows_the_queue_up_to_the_maximum(queued, busy, placed, start):
    assert workers_to_start(PoolLoad(queued, busy), placed, SCALED) == start


def test_a_fixed_pool_replaces_its_dead_workers_without_work():
    fixed = ScalePolicy(max_workers=2, min_workers=2, idle_exit_s=None)
    assert workers_to_start(PoolLoad(0, 0), 1, fixed) == 1


def test_the_pool_sees_only_the_work_its_workers_could_claim(settings, factory):
    queue = queue_on(factory)
    queue.submit([jobs.NewJob("builtin:tiny", "echo", {}),  # any worker
                  jobs.NewJob("builtin:tiny", "echo", {}, worker_label="h100"),
                  jobs.NewJob("builtin:tiny", "echo", {}, worker_label="a100"),
                  jobs.NewJob("builtin:tiny", "echo", {}, num_gpus=2),
                  jobs.NewJob("builtin:tiny", "echo", {}, data_parallel=3)])  # 3 shards
    book = ClusterBook(factory, settings.lease_seconds)
    assert book.load(PoolShape("p", labels=("h100",), gpus=1)) == PoolLoad(queued=5, busy=0)
    assert book.load(PoolShape("p", gpus=2)) == PoolLoad(queued=5, busy=0)
    # a worker of the pool claims one: busy; a job whose lease expired is work again
    job = queue.claim("p-1", capacity=PoolShape("p", gpus=1).capacity())
    queue.workers.register("p-1", "node", 1, "cpu", labels=["p", "p-1"],
                           current_job_id=job.id)
    assert book.load(PoolShape("p", gpus=1)) == PoolLoad(queued=3, busy=1)  # 4 less 1
    with write_session(factory) as session:
        session.execute(sa.update(Job).where(Job.id == job.id).values(
            lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert queue.get(job.id).state == JobState.RUNNING.value
    assert book.load(PoolShape("p", gpus=1)).queued == 4


def test_decisions_are_kept_for_the_workers_view(client, settings, factory):
    book = ClusterBook(factory, settings.lease_seconds)
    book.record("ray-1gpu", "ray", PoolLoad(3, 0), placed=0, started=3,
                message="3 queued for the pool, 0 busy, 0 held: asked ray for 3 more")
    answer = client.get("/api/cluster").get_json()["data"]
    (pool,) = answer["pools"]
    assert pool["pool"] == "ray-1gpu" and pool["engine"] == "ray"
    assert pool["queued"] == 3 and pool["started"] == 3 and "asked ray" in pool["message"]
    assert answer["decisions"][0]["message"] == pool["message"]


def test_dry_run_prints_the_slurm_script(settings, capsys):
    assert cluster_main(["slurm", "--dry-run", "--max-workers", "3", "--partition", "gpu",
                         "--labels", "h100", "--gpus-per-worker", "2", "--time", "60"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --array=0-2", "#SBATCH --partition=gpu",
                 "#SBATCH --gpus-per-task=2", "#SBATCH --time=60",
                 "export LBS_WORKER_LABELS=slurm-2gpu,h100", "--idle-exit 120",
                 "--max-runtime 3480"):
        assert line in script
    assert "LBS_DATABASE_URL" not in script  # the job's environment carries it


@pytest.mark.parametrize("argv", [["slurm", "--dry-run"], ["slurm", "--max-workers", "0"],
                                  ["ray", "--max-workers", "2", "--resource", "h100=x"]])
def test_bad_arguments_are_refused_with_their_name(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cluster_main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--max-workers" in err or "--resource" in err or "h100=x" in err


@pytest.mark.parametrize(("body", "field"), [
    ({"engine": "slurm"}, "max_workers"),
    ({"engine": "kubernetes", "max_workers": 2}, "engine"),
    ({"engine": "slurm", "max_workers": 0}, "max_workers"),
    ({"engine": "slurm", "max_workers": 2, "labels": ["h100", "a b"]}, "labels[1]"),
    ({"engine": "slurm", "max_workers": 2, "partition": "gpu; rm -rf /"}, "partition"),
    ({"engine": "ray", "max_workers": 2, "workers": 3}, "workers"),
])
def test_starting_a_pool_refuses_bad_fields_by_name(client, body, field):
    answer = client.post("/api/cluster", json=body)
    assert answer.status_code == 422, answer.get_json()
    assert field in [d["field"] for d in answer.get_json()["error"]["details"]]


def test_stopping_a_pool_that_runs_nowhere_is_a_404(client):
    answer = client.delete("/api/cluster/nowhere")
    assert answer.status_code == 404
    assert answer.get_json()["error"]["details"][0]["field"] == "pool"


def test_starting_a_pool_from_the_api_is_off_unless_the_operator_allows_it(client):
    answer = client.post("/api/cluster", json={"engine": "slurm", "max_workers": 2})
    assert answer.status_code == 403
    assert answer.get_json()["error"]["details"][0]["field"] == "LBS_CLUSTER_FROM_API"
