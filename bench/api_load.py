"""API responsiveness under load: many clients polling job status and listing jobs
against a real server while its worker runs a job.

    .venv/bin/python bench/api_load.py [--clients 50] [--seconds 30] [--pace 0.5]
                                       [--model builtin:small]

Starts `python -m backend.server` (one worker) in a temporary data dir, queues a long
NIAH job so the worker is busy generating for the whole run, and seeds 200 finished
rows to list. Then `--clients` client threads, spread over several client processes
(so the load generator's own GIL is not the bottleneck), each loop for `--seconds`:
GET /api/jobs/<running id>, GET /api/jobs?per_page=20, GET /api/jobs/<random id>.
Each client keeps its connection open, as a browser or script polling would.

Two kinds of load, each first with the worker idle (the baseline) and then while it
runs the job:

  closed loop   every client sends its next request as soon as the last one answered:
                the most the server can serve; latency then is about clients / throughput
  paced         every client polls once every `--pace` seconds (0.5 s: 100 requests/s
                from 50 clients, four times what 50 open web pages send at their 2 s
                poll), like real polling clients; latency is the server's own

Prints requests/s, p50/p90/p99/max latency and errors per phase, and the ratios
busy/idle. Target: p99 < 100 ms, 0 errors.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from local_server import running_server  # bench/ is this script's folder

LONG_JOB = {"context_lengths": [2048, 4096, 6144], "depth_percents": {"count": 11},
            "max_new_tokens": 64}


def _call(conn: http.client.HTTPConnection, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    return res.status, json.loads(res.read() or b"null")


def _client_process(port: int, threads: int, seconds: float, pace: float, running_id: int,
                    max_id: int, start, out) -> None:
    import threading

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, bad = [], []
        paths = [f"/api/jobs/{running_id}", "/api/jobs?per_page=20&page=1"]
        deadline = time.monotonic() + seconds
        next_at = time.monotonic() + rng.uniform(0, pace)  # spread the clients' phases
        i = 0
        while time.monotonic() < deadline:
            if pace:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += pace
            path = paths[i % 2] if i % 3 else f"/api/jobs/{rng.randint(1, max_id)}"
            i += 1
            t0 = time.perf_counter()
            try:
                status, _ = _call(conn, "GET", path)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                bad.append(f"{path}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            mine.append(time.perf_counter() - t0)
            if status != 200:
                bad.append(f"{path}: HTTP {status}")
        conn.close()
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    start.wait()
    workers = [threading.Thread(target=loop, args=(os.getpid() * 1000 + k,))
               for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.put((latencies, errors))


def _load(port: int, clients: int, seconds: float, pace: float, running_id: int,
          max_id: int) -> dict:
    ctx = mp.get_context("spawn")
    processes = min(clients, max(2, (os.cpu_count() or 2) * 2))
    per = [clients // processes + (1 if k < clients % processes else 0)
           for k in range(processes)]
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_client_process,
                         args=(port, n, seconds, pace, running_id, max_id, start, out))
             for n in per]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let every client process import and get ready
    t0 = time.perf_counter()
    start.set()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    latencies = sorted(x for lat, _ in results for x in lat)
    errors = [e for _, errs in results for e in errs]

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {"requests": len(latencies), "rps": len(latencies) / wall, "errors": len(errors),
            "error_samples": errors[:5], "p50_ms": q(0.50), "p90_ms": q(0.90),
            "p99_ms": q(0.99), "max_ms": latencies[-1] * 1000,
            "mean_ms": statistics.fmean(latencies) * 1000}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--pace", type=float, default=0.5,
                        help="seconds between two polls of one client in the paced phases")
    parser.add_argument("--model", default="builtin:small")
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="lbs-api-load-"))
    env = {**os.environ, "LBS_DATA_DIR": str(data), "LBS_WORKERS": "1",
           "LBS_ENV_FILE": str(data / "no.env"), "LBS_LOG_LEVEL": "WARNING"}
    with open(data / "server.log", "wb") as log, running_server(env, log) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        # rows to list: small jobs, cancelled while queued (they never run)
        status, body = _call(conn, "POST", "/api/jobs", {"jobs": [
            {"model": "builtin:tiny", "dataset": "needle_in_haystack",
             "params": {"context_lengths": [256], "depth_percents": [50]}}] * 200})
        assert status == 201, body
        ids = [j["id"] for j in body["data"]["jobs"]]
        for job_id in ids:
            _call(conn, "POST", f"/api/jobs/{job_id}/cancel")

        phases = {"closed loop, idle worker": _load(port, args.clients, args.seconds, 0.0,
                                                    ids[0], ids[-1]),
                  "paced, idle worker": _load(port, args.clients, args.seconds, args.pace,
                                              ids[0], ids[-1])}

        status, body = _call(conn, "POST", "/api/jobs", {
            "model": args.model, "dataset": "needle_in_haystack", "params": LONG_JOB})
        assert status == 201, body
        running = body["data"]["job"]["id"]
        while _call(conn, "GET", f"/api/jobs/{running}")[1]["data"]["job"]["progress"]["done"] < 1:
            time.sleep(0.5)  # loaded and generating
        phases["closed loop, job running"] = _load(port, args.clients, args.seconds, 0.0,
                                                   running, running)
        phases["paced, job running"] = _load(port, args.clients, args.seconds, args.pace,
                                             running, running)
        job = _call(conn, "GET", f"/api/jobs/{running}")[1]["data"]["job"]
        still_running = job["state"] == "running"
        _call(conn, "POST", f"/api/jobs/{running}/cancel")

    print(f"api_load: {args.clients} clients, {args.seconds:g} s per phase, paced phases "
          f"poll every {args.pace:g} s per client, {os.cpu_count()} CPUs, job model "
          f"{args.model}")
    print(f"{'phase':<28}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}"
          f"{'p99 ms':>9}{'max ms':>9}{'errors':>8}")
    for name, r in phases.items():
        print(f"{name:<28}{r['requests']:>9}{r['rps']:>9.0f}{r['p50_ms']:>9.1f}"
              f"{r['p90_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}{r['errors']:>8}")
    for kind in ("closed loop", "paced"):
        idle, busy = phases[f"{kind}, idle worker"], phases[f"{kind}, job running"]
        print(f"{kind}: busy/idle req/s {busy['rps'] / idle['rps']:.2f}, "
              f"p99 {busy['p99_ms'] / idle['p99_ms']:.2f}")
    print(f"the job was still running at the end of the busy phases: {still_running} "
          f"({job['progress']['done']}/{job['progress']['total']} samples)")
    for r in phases.values():
        for e in r["error_samples"]:
            print("error:", e)
    return 0 if all(r["errors"] == 0 for r in phases.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
