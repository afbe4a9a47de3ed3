"""/healthz and the workers' status."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, current_app

from backend.db import utcnow
from backend.jobs import list_workers

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "success", "data": {"ok": True}}


@bp.get("/api/workers")
def workers():
    lbs = current_app.extensions["lbs"]
    stale_after = timedelta(seconds=max(15.0, lbs.settings.lease_seconds))
    now = utcnow()
    rows = [{"id": w.id, "host": w.host, "pid": w.pid, "device": w.device, "state": w.state,
             "current_job_id": w.current_job_id, "started_at": w.started_at.isoformat(),
             "heartbeat_at": w.heartbeat_at.isoformat(),
             "alive": w.state != "stopped" and now - w.heartbeat_at < stale_after}
            for w in list_workers(lbs.factory)]
    return {"status": "success", "data": {"workers": rows}}
