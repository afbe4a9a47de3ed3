"""/api/cluster: what the cluster controllers (`lbs cluster ray|slurm`) decided, for the
Workers view: each pool's latest look at the queue, and the recent decisions."""

from __future__ import annotations

from flask import Blueprint, current_app

from backend.apps.api.openapi import documented
from backend.queue.cluster import ClusterBook
from backend.queue.db import ClusterDecision

bp = Blueprint("cluster", __name__)

RECENT = 20


def _row(d: ClusterDecision) -> dict:
    return {"pool": d.pool, "engine": d.engine, "at": d.at.isoformat(), "queued": d.queued,
            "busy": d.busy, "placed": d.placed, "started": d.started, "message": d.message}


@bp.get("/api/cluster")
@documented("the cluster controllers' decisions: per pool its latest (queued work, busy "
            "and held workers, workers asked for), and the recent ones, newest first",
            data={"pools": [{"type": "object"}], "decisions": [{"type": "object"}]})
def cluster():
    lbs = current_app.extensions["lbs"]
    book = ClusterBook(lbs.queue.factory, lbs.settings.lease_seconds)
    return {"status": "success", "data": {"pools": [_row(d) for d in book.latest()],
                                          "decisions": [_row(d) for d in book.recent(RECENT)]}}
