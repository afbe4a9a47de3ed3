"""/healthz and the workers' status."""

from __future__ import annotations

from flask import Blueprint, current_app

from backend.apps.api.openapi import documented
from backend.queue.db import utcnow
from backend.queue.scheduling import is_alive, worker_state

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@documented("liveness", data={"ok": {"const": True}})
def healthz():
    return {"status": "success", "data": {"ok": True}}


@bp.get("/api/workers")
@documented("workers and their heartbeats: host, labels, GPUs, state (`lost` when the "
            "heartbeats stopped)", data={"workers": [{"type": "object"}]})
def workers():
    """Every worker that registered: host, labels, GPUs (count, names, total and free
    memory), heartbeat, and state; `lost` when its heartbeats stopped."""
    lbs = current_app.extensions["lbs"]
    lease = lbs.settings.lease_seconds
    now = utcnow()
    rows = []
    for w in lbs.queue.workers.all():
        state = worker_state(w, now, lease)
        rows.append({
            "id": w.id, "host": w.host, "pid": w.pid, "device": w.device, "state": state.value,
            "current_job_id": w.current_job_id, "labels": w.labels or [],
            "gpu_count": w.gpu_count or 0, "gpus": w.gpus or [],
            "gpu_free_bytes": w.gpu_free_bytes, "started_at": w.started_at.isoformat(),
            "heartbeat_at": w.heartbeat_at.isoformat(),
            "heartbeat_age_s": round((now - w.heartbeat_at).total_seconds(), 1),
            "alive": is_alive(w, now, lease)})
    return {"status": "success", "data": {"workers": rows}}
