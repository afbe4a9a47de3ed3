"""The queue on its own: jobs per second and claim latency with 1, 2, 4 and 8 worker
processes on trivial jobs, on SQLite and on PostgreSQL.

    .venv/bin/python bench/queue_bench.py [--jobs 400] [--latency-jobs 30] [--workers 1,2,4,8]
                                          [--engines sqlite,postgresql] [--postgres-url URL]

Each worker process runs the worker's claim loop without a model: `Queue.claim`,
one `record_sample`, `finish`; with the queue empty it waits as a real
worker does (notify.WorkWaiter: LISTEN/NOTIFY on PostgreSQL; on SQLite a read of
the queue every 50 ms and a claim when it changed, or every LBS_POLL_INTERVAL =
0.5 s). Every configuration starts on a fresh database with idle workers.

  jobs/s         `--jobs` jobs submitted in one request, from the submit to the
                 last job finished (first created_at to last finished_at)
  claim latency  submit -> claim of a job submitted alone while every worker is
                 idle (created_at -> claimed_at): median and 95th percentile of
                 `--latency-jobs` jobs submitted one at a time, 50-150 ms apart

PostgreSQL is a throwaway server (initdb in a temporary folder, as the tests
do; PostgreSQL must be installed) with synchronous_commit=off: commits do not
wait for the disk, like SQLite's WAL with synchronous=NORMAL that the harness
uses. `--postgres-url` (a server you run; a database is created per run) instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def worker_loop(url: str, worker_id: str, poll: float, listen_timeout: float, stop,
                ready) -> None:
    from backend.queue.db import JobState, session_factory
    from backend.queue.jobs import Queue
    from backend.queue.notify import WorkWaiter

    queue = Queue(session_factory(url), lease_seconds=60, max_attempts=3)
    queue.workers.register(worker_id, socket.gethostname(), os.getpid(), "cpu")
    waiter = WorkWaiter(url)
    waiter.wait(0.001, 0.001, stop)  # LISTEN before saying ready
    ready.put(worker_id)
    sample = dict(idx=0, prompt="p", prompt_tokens=1, prediction="x", score=1.0,
                  latency_s=0.0, output_tokens=1, fields={})
    while not stop.is_set():
        waiter.mark()
        job = queue.claim(worker_id)
        if job is None:
            waiter.wait(poll, listen_timeout, stop)
            continue
        queue.record_sample(job.id, worker_id, sample)
        queue.finish(job.id, worker_id, JobState.SUCCEEDED)
    waiter.close()


def _wait_finished(factory, count: int, timeout: float = 600) -> None:
    import sqlalchemy as sa

    from backend.queue.db import Job, JobState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with factory() as s:
            done = s.scalar(sa.select(sa.func.count()).select_from(Job)
                            .where(Job.state == JobState.SUCCEEDED.value))
        if done >= count:
            return
        time.sleep(0.002)
    raise TimeoutError(f"only {done} of {count} jobs finished")


def measure(url: str, workers: int, n_jobs: int, latency_jobs: int) -> dict:
    import sqlalchemy as sa

    from backend.queue.db import Job, dispose_engines, session_factory
    from backend.queue.jobs import NewJob, Queue

    factory = session_factory(url)  # migrates before the workers start
    queue = Queue(factory, lease_seconds=60, max_attempts=3)
    ctx = mp.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker_loop, args=(url, f"bench-{i}", 0.5, 10.0, stop, ready))
             for i in range(workers)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        time.sleep(0.3)
        # claim latency: one job at a time into an idle pool
        latencies = []
        for i in range(latency_jobs):
            (job,) = queue.submit([NewJob("m", "echo", {})])
            _wait_finished(factory, i + 1)
            with factory() as s:
                row = s.get(Job, job.id)
                latencies.append((row.claimed_at - row.created_at).total_seconds())
            time.sleep(random.uniform(0.05, 0.15))
        # throughput: a batch into an idle pool
        time.sleep(0.6)
        queue.submit([NewJob("m", "echo", {}) for _ in range(n_jobs)])
        _wait_finished(factory, latency_jobs + n_jobs)
        with factory() as s:
            first, last = s.execute(sa.select(sa.func.min(Job.created_at),
                                              sa.func.max(Job.finished_at))
                                    .where(Job.id > latency_jobs)).one()
            attempts = s.scalar(sa.select(sa.func.max(Job.attempts)))
    finally:
        stop.set()
        for p in procs:
            p.join(30)
        dispose_engines()
    assert attempts == 1, "a job was claimed twice"
    latencies.sort()
    return {"jobs_per_s": n_jobs / (last - first).total_seconds(),
            "latency_median_ms": 1000 * statistics.median(latencies),
            "latency_p95_ms": 1000 * latencies[max(0, round(0.95 * len(latencies)) - 1)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--latency-jobs", type=int, default=30)
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--postgres-url", help="an existing server (postgresql+psycopg://…)")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    results: list[tuple[str, int, dict]] = []
    server = None
    tmp = Path(tempfile.mkdtemp(prefix="lbs-bench-queue-"))
    try:
        for engine in args.engines.split(","):
            for workers in counts:
                if engine == "sqlite":
                    url = f"sqlite:///{tmp / f'queue-{workers}.sqlite3'}"
                else:
                    if server is None and not args.postgres_url:
                        from tests.postgres import PostgresServer, find_bin_dir

                        bin_dir = find_bin_dir()
                        if bin_dir is None:
                            print("PostgreSQL is not installed: skipping it", file=sys.stderr)
                            break
                        server = PostgresServer(bin_dir).start("-c synchronous_commit=off")
                    url = _create_database(args.postgres_url or server.admin_url, workers) \
                        if args.postgres_url else server.create_database(f"bench_{workers}")
                result = measure(url, workers, args.jobs, args.latency_jobs)
                results.append((engine, workers, result))
                print(f"{engine} x{workers}: {result}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
    print("\n| engine | worker processes | jobs/s | claim latency median | claim latency p95 |")
    print("| --- | --- | --- | --- | --- |")
    for engine, workers, r in results:
        print(f"| {engine} | {workers} | {r['jobs_per_s']:.0f} | "
              f"{r['latency_median_ms']:.1f} ms | {r['latency_p95_ms']:.1f} ms |")
    return 0


def _create_database(url: str, workers: int) -> str:
    import psycopg
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    name = f"lbs_bench_{workers}_{int(time.time())}"
    admin = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return parsed.set(drivername="postgresql+psycopg", database=name) \
        .render_as_string(hide_password=False)


if __name__ == "__main__":
    sys.exit(main())
