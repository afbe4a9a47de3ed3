"""Cold scale-up and worker start on Ray and Slurm, against a plain `lbs worker`, in one run.

    .venv/bin/python bench/cluster_scale.py [--repeats 2]

A throwaway PostgreSQL holds the queue; a local Ray (2 pretend GPUs) and a single-node
Slurm (tests/slurm.py) run the workers, on this machine's CPUs. For each engine:

- worker start: the engine is asked for one worker (or `lbs worker` is started as a
  process, the baseline) -> its row appears in `workers` (it registered: torch imported,
  model manager made, heartbeat started);
- cold scale-up: with 0 workers held and a controller looking every second, a small NIAH
  job (builtin:tiny, 1 sample) is submitted -> its first sample is stored. The baseline
  is the same job submitted to a worker already idle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOB = {"context_lengths": [256], "depth_percents": [50], "max_new_tokens": 2}


def wait(predicate, timeout: float = 300.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit("timed out")
        time.sleep(0.05)
    return time.monotonic() - start


def has_rows(factory, table) -> bool:
    with factory() as session:
        return session.query(table).count() > 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lbs-cluster-bench-"))
    os.environ.update({"LBS_DATA_DIR": str(work / "data"), "LBS_ENV_FILE": str(work / "x"),
                       "LBS_LOG_LEVEL": "WARNING", "TQDM_DISABLE": "1",
                       "LBS_POLL_INTERVAL": "0.1", "HF_HUB_OFFLINE": "1"})
    import ray

    from backend.apps.cluster.controller import Controller, ScalePolicy, worker_overrides
    from backend.apps.cluster.ray_pool import RayPool
    from backend.apps.cluster.slurm_pool import SlurmOptions, SlurmPool
    from backend.common.config import load_settings
    from backend.queue import jobs
    from backend.queue.cluster import PoolShape
    from backend.queue.db import Sample, WorkerRow, session_factory
    from backend.queue.jobs import Queue
    from backend.runners.builtin import ensure_builtin_model
    from tests.postgres import PostgresServer, find_bin_dir
    from tests.slurm import SlurmCluster

    ensure_builtin_model(work / "data", "tiny")
    pg = PostgresServer(find_bin_dir()).start()
    slurm = SlurmCluster().start()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for repeat in range(args.repeats):
            for engine in ("baseline", "ray", "slurm"):
                os.environ["LBS_DATABASE_URL"] = pg.create_database()
                settings = load_settings()
                factory = session_factory(settings.database_url)
                queue = Queue.from_settings(settings)
                pool = PoolShape(f"bench-{engine}", gpus=1 if engine == "ray" else 0)
                overrides = worker_overrides(settings, pool)
                registered = partial(has_rows, factory, WorkerRow)
                sampled = partial(has_rows, factory, Sample)
                if engine == "baseline":
                    t0 = time.monotonic()
                    proc = subprocess.Popen([sys.executable, "-m", "backend.apps.lbs", "worker"],
                                            cwd=ROOT, env={**settings.child_env(), **overrides})
                    try:
                        wait(registered)
                        start_s = time.monotonic() - t0
                        t0 = time.monotonic()
                        queue.submit([jobs.NewJob("builtin:tiny", "needle_in_haystack", JOB)])
                        wait(sampled)
                        scale_s = time.monotonic() - t0
                    finally:
                        proc.terminate()
                        proc.wait()
                else:
                    place = (RayPool(pool, overrides, idle_exit_s=3.0) if engine == "ray" else
                             SlurmPool(pool, SlurmOptions(cpus=1, time_minutes=10, log_dir=work,
                                                          extra=(f"--chdir={ROOT}",),
                                                          command=f"{sys.executable} -m "
                                                                  "backend.apps.lbs"),
                                       {**settings.child_env(), **slurm.env},
                                       labels=overrides["LBS_WORKER_LABELS"],
                                       idle_exit_s=3.0))
                    t0 = time.monotonic()
                    place.place(1)
                    wait(registered)
                    start_s = time.monotonic() - t0
                    wait(lambda engine=place: engine.placed() == 0)  # idle exit: 0 held
                    control = Controller(settings, pool, place,
                                         ScalePolicy(max_workers=1, idle_exit_s=3.0,
                                                     interval_s=1.0))
                    stop = threading.Event()
                    loop = threading.Thread(target=control.run, args=(stop,))
                    loop.start()
                    t0 = time.monotonic()
                    queue.submit([jobs.NewJob("builtin:tiny", "needle_in_haystack", JOB)])
                    wait(sampled)
                    scale_s = time.monotonic() - t0
                    stop.set()
                    loop.join()
                for name, value in (("worker start", start_s), ("submission -> first sample",
                                                                scale_s)):
                    results.setdefault(name, {}).setdefault(engine, []).append(value)
                print(f"repeat {repeat + 1} {engine:8}: worker start {start_s:6.2f} s, "
                      f"submission -> first sample {scale_s:6.2f} s", flush=True)
    finally:
        ray.shutdown()
        slurm.stop()
        pg.stop()
    print("\nmedians (baseline: a plain `lbs worker` process; its first sample with the "
          "worker already idle)")
    for name, by_engine in results.items():
        base = statistics.median(by_engine["baseline"])
        print(f"{name:28} " + "  ".join(
            f"{engine} {statistics.median(v):6.2f} s ({statistics.median(v) / base:4.1f}x)"
            for engine, v in by_engine.items()))


if __name__ == "__main__":
    main()
