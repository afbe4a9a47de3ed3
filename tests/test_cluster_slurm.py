"""Workers placed by Slurm and scaled with the queue, on a real single-node Slurm started
for the module (tests/slurm.py) whose node has two pretend GPUs, against the test
PostgreSQL queue."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backend.apps.cluster.controller import Controller, ScalePolicy
from backend.apps.cluster.slurm_pool import SlurmOptions, SlurmPool, render_script
from backend.queue import jobs
from backend.queue.cluster import PoolShape
from backend.queue.db import JobState
from tests.conftest import queue_on
from tests.test_worker_exit import wait_until, with_slow_plugin

ROOT = Path(__file__).resolve().parent.parent
POOL = PoolShape("slurm-test", labels=("h100",), gpus=1)


@pytest.fixture(scope="module")
def slurm():
    from tests.slurm import running_cluster

    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def slow_settings(settings, tmp_path):
    return with_slow_plugin(settings, tmp_path)


def _options(tmp_path) -> SlurmOptions:
    # this checkout's code, not an installed copy: run from the repository root
    return SlurmOptions(cpus=1, time_minutes=10, log_dir=tmp_path,
                        extra=(f"--chdir={ROOT}",), command=f"{sys.executable} -m backend.apps.lbs")


def test_the_rendered_script_passes_slurms_own_parser(slurm, tmp_path):
    script = render_script(POOL, _options(tmp_path), 3, "slurm-test,h100", 120)
    assert "#SBATCH --array=0-2" in script and "#SBATCH --gpus-per-task=1" in script
    assert "--idle-exit 120" in script and "--max-runtime 480" in script
    checked = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True,
                             text=True, env=slurm.env)
    assert checked.returncode == 0, checked.stderr
    assert "to start at" in checked.stderr


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_slurm_workers_run_a_data_parallel_job_once_and_exit_when_idle(
        slurm, slow_settings, factory, with_tiny, tmp_path):
    settings = slow_settings
    engine = SlurmPool(POOL, _options(tmp_path), {**settings.child_env(), **slurm.env},
                       labels="slurm-test,h100", idle_exit_s=2.0)
    control = Controller(settings, POOL, engine,
                         ScalePolicy(max_workers=2, idle_exit_s=2.0, interval_s=0.5))
    (job,) = queue_on(factory).submit([jobs.NewJob(  # 4 s a shard: both workers get one
        "builtin:tiny", "slow_echo", {"items": 8, "seconds": 1.0}, data_parallel=2,
        worker_label="h100")])
    runner = threading.Thread(target=control.run, args=(done := threading.Event(),))
    started = time.monotonic()
    runner.start()
    try:
        wait_until(lambda: queue_on(factory).get(job.id).state in ("succeeded", "failed"), 180,
              "the job")
        view = queue_on(factory).get(job.id)
        logs = "\n".join(p.read_text() for p in tmp_path.glob("lbs-worker-*.log"))
        assert view.state == JobState.SUCCEEDED.value, (view.error, logs)
        samples, total = queue_on(factory).samples(job.id)
        assert sorted(s.idx for s in samples) == list(range(8)) and total == 8
        ran_on = {s.worker_id for s in queue_on(factory).shards(job.id)}
        assert len(ran_on) == 2 and all(w.startswith("slurm-test-") for w in ran_on)
        wait_until(lambda: control.book.recent(1)[0].placed == 0, 60, "the idle workers to exit")
    finally:
        done.set()
        runner.join(60)
    print(f"slurm: job done and workers gone in {time.monotonic() - started:.1f} s")
    seen = [(d.placed, d.started) for d in reversed(control.book.recent(50))]
    assert seen[0] == (0, 2) and seen[-1][0] == 0
    stopped = [w for w in queue_on(factory).workers.all() if w.id in ran_on]
    assert [w.state for w in stopped] == ["stopped", "stopped"]


def test_an_operator_starts_and_stops_a_pool_through_the_api(slurm, with_tiny, monkeypatch):
    from backend.common.config import load_settings
    from backend.server import create_app

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])  # the controller's sbatch
    monkeypatch.setenv("LBS_CLUSTER_FROM_API", "1")
    client = create_app(load_settings(), {"TESTING": True}).test_client()
    answer = client.post("/api/cluster", json={"engine": "slurm", "max_workers": 2,
                                               "gpus_per_worker": 0, "pool": "api-pool"})
    assert answer.status_code == 202, answer.get_json()
    assert answer.get_json()["data"]["command"].startswith("lbs cluster slurm --max-workers 2")
    assert client.post("/api/cluster", json={"engine": "slurm", "max_workers": 1,
                                             "pool": "api-pool"}).status_code == 409

    def pools():
        return {p["pool"]: p for p in client.get("/api/cluster").get_json()["data"]["pools"]}
    wait_until(lambda: "api-pool" in pools(), 60, "the controller's first look")
    assert pools()["api-pool"]["message"].endswith("no worker held (no GPU in use)")
    (running,) = client.get("/api/cluster").get_json()["data"]["controllers"]
    assert running["pool"] == "api-pool"
    assert client.delete("/api/cluster/api-pool").status_code == 202
    wait_until(lambda: not client.get("/api/cluster").get_json()["data"]["controllers"], 30,
               "the controller to stop")
