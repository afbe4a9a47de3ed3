"""/api/cluster: the cluster controllers (`lbs cluster ray|slurm`), for an operator and
the Workers view: what each pool's controller decided, and the controllers this server
started (POST /api/cluster starts one as a child process, DELETE stops it, and its
workers give their jobs back)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Annotated, Literal

from flask import Blueprint, current_app, request
from pydantic import BaseModel, ConfigDict, Field

from backend.apps.api.errors import ApiError
from backend.apps.api.openapi import documented
from backend.queue.cluster import ClusterBook
from backend.queue.db import ClusterDecision

log = logging.getLogger(__name__)
bp = Blueprint("cluster", __name__)

RECENT = 20
NAME = r"^[\w.:@-]{1,64}$"
"""A pool's name, a label or a partition: what a worker label may hold."""


class ClusterStart(BaseModel):
    """A pool to scale with the queue (the flags of `lbs cluster ray|slurm`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    engine: Literal["ray", "slurm"]
    max_workers: int = Field(ge=1, le=1024)
    gpus_per_worker: int = Field(1, ge=0, le=64)
    labels: list[Annotated[str, Field(pattern=NAME)]] = Field(default_factory=list,
                                                              max_length=16)
    pool: str | None = Field(None, pattern=NAME)
    idle_exit_s: float = Field(120.0, gt=0, le=86400)
    address: str | None = Field(None, min_length=1, max_length=256,
                                pattern=r"^[\w.:/@-]+$", description="ray only")
    partition: str | None = Field(None, pattern=NAME, description="slurm only")
    time_minutes: int = Field(240, ge=1, le=525600, description="slurm only")

    def argv(self) -> list[str]:
        pool = self.pool or f"{self.engine}-{self.gpus_per_worker}gpu"
        argv = [self.engine, "--max-workers", str(self.max_workers), "--pool", pool,
                "--gpus-per-worker", str(self.gpus_per_worker),
                "--idle-exit", f"{self.idle_exit_s:g}"]
        if self.labels:
            argv += ["--labels", ",".join(self.labels)]
        if self.engine == "ray" and self.address:
            argv += ["--address", self.address]
        if self.engine == "slurm":
            argv += ["--time", str(self.time_minutes)]
            if self.partition:
                argv += ["--partition", self.partition]
        return argv

    @property
    def pool_name(self) -> str:
        return self.pool or f"{self.engine}-{self.gpus_per_worker}gpu"


def _controllers() -> dict[str, tuple[subprocess.Popen, list[str]]]:
    """The controllers this server started, by pool (only the running ones stay)."""
    procs = current_app.extensions.setdefault("lbs_cluster", {})
    for pool in [p for p, (proc, _) in procs.items() if proc.poll() is not None]:
        log.info("[Cluster] the controller of pool %s ended (exit status %s)", pool,
                 procs.pop(pool)[0].returncode)
    return procs


def _row(d: ClusterDecision) -> dict:
    return {"pool": d.pool, "engine": d.engine, "at": d.at.isoformat(), "queued": d.queued,
            "busy": d.busy, "placed": d.placed, "started": d.started, "message": d.message}


@bp.get("/api/cluster")
@documented("the cluster controllers: per pool its latest decision (queued work, busy "
            "and held workers, workers asked for), the recent ones newest first, and the "
            "controllers this server started",
            data={"pools": [{"type": "object"}], "decisions": [{"type": "object"}],
                  "controllers": [{"type": "object"}]})
def cluster():
    lbs = current_app.extensions["lbs"]
    book = ClusterBook(lbs.queue.factory, lbs.settings.lease_seconds)
    return {"status": "success", "data": {
        "pools": [_row(d) for d in book.latest()],
        "decisions": [_row(d) for d in book.recent(RECENT)],
        "controllers": [{"pool": pool, "pid": proc.pid, "command": "lbs cluster " +
                         " ".join(argv)} for pool, (proc, argv) in _controllers().items()]}}


@bp.post("/api/cluster")
@documented("start a controller that places workers with Ray or Slurm and scales them "
            "with the queue (`lbs cluster`, as a child process of this server)",
            body=ClusterStart, status=202,
            data={"pool": {"type": "string"}, "pid": {"type": "integer"},
                  "command": {"type": "string"}}, errors=(400, 403, 409, 422))
def start():
    raw = request.get_json(silent=True) if request.data else {}
    if not isinstance(raw, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object",
                       [{"field": "body", "message": "expected a JSON object"}])
    body = ClusterStart.model_validate(raw)
    lbs = current_app.extensions["lbs"]
    if not lbs.settings.cluster_from_api:
        raise ApiError(403, "cluster_from_api_off", "starting cluster controllers from the "
                       "API is off on this server; set LBS_CLUSTER_FROM_API=1, or run "
                       "`lbs cluster ray|slurm` where the cluster is reachable",
                       [{"field": "LBS_CLUSTER_FROM_API", "message": "not set"}])
    procs = _controllers()
    if body.pool_name in procs:
        raise ApiError(409, "pool_running", f"a controller of pool {body.pool_name!r} runs "
                       "already; stop it first (DELETE /api/cluster/<pool>)",
                       [{"field": "pool", "message": "taken by a running controller"}])
    logs = lbs.settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    argv = body.argv()
    with open(logs / f"cluster-{body.pool_name}.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "backend.apps.lbs", "cluster", *argv,
                                 "--parent-pid", str(os.getpid())],
                                env=lbs.settings.child_env(), cwd=os.getcwd(), stdout=out,
                                stderr=subprocess.STDOUT)
    procs[body.pool_name] = (proc, argv)
    log.info("[Cluster] started the controller of pool %s (pid %d): lbs cluster %s",
             body.pool_name, proc.pid, " ".join(argv))
    return {"status": "success", "data": {"pool": body.pool_name, "pid": proc.pid,
                                          "command": "lbs cluster " + " ".join(argv)}}, 202


@bp.delete("/api/cluster/<pool>")
@documented("stop a controller this server started: its workers stop between two "
            "samples and give their jobs back", status=202,
            data={"pool": {"type": "string"}, "stopping": {"const": True}}, errors=(404,))
def stop(pool: str):
    procs = _controllers()
    if pool not in procs:
        raise ApiError(404, "not_found", f"no controller of pool {pool!r} runs here",
                       [{"field": "pool", "message": "not a running controller's pool"}])
    proc, _ = procs[pool]
    proc.send_signal(signal.SIGTERM)
    log.info("[Cluster] stopping the controller of pool %s (pid %d)", pool, proc.pid)
    return {"status": "success", "data": {"pool": pool, "stopping": True}}, 202
