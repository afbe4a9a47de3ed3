"""`python -m backend.server` (with its worker) as a subprocess on a free loopback port,
for the benchmarks that measure through HTTP (overhead.py, api_load.py, data_parallel.py,
length_batching.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(env: dict[str, str], log: IO[bytes] | int = subprocess.DEVNULL,
                   start_timeout: float = 60.0) -> Iterator[int]:
    """Start a server with `env` (LBS_PORT set here), yield its port once /healthz
    answers, and stop it after. A worker stops after its current sample, which may be
    long: the server gets 120 s to stop before it is killed."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "backend.server"], cwd=ROOT,
                              env={**env, "LBS_PORT": str(port)}, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the server did not answer on port {port}") from None
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def http_json(url: str, body: dict | None = None) -> dict:
    """GET `url` (or POST `body` as JSON) and return the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=60) as res:
        return json.loads(res.read())


def run_job(base: str, body: dict, poll: float = 0.5) -> tuple[float, dict, list[dict]]:
    """Submit `body` to the server at `base`, wait for the job to succeed, and return
    its duration as stored (claim -> finish, so polling does not count), the job and
    its samples."""
    job = http_json(base + "/api/jobs", body)["data"]["job"]
    while job["state"] in ("queued", "running"):
        time.sleep(poll)
        job = http_json(f"{base}/api/jobs/{job['id']}")["data"]["job"]
    assert job["state"] == "succeeded", job["error"]
    samples = http_json(f"{base}/api/jobs/{job['id']}/samples")["data"]["samples"]
    took = (datetime.fromisoformat(job["finished_at"])
            - datetime.fromisoformat(job["started_at"])).total_seconds()
    return took, job, samples
