"""/api/leaderboard: results across jobs (models x datasets, memory against length)."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, current_app

from backend.apps.api.openapi import documented
from backend.queue import results
from backend.runners.models import ModelNotFound, resolve_model

bp = Blueprint("results", __name__, url_prefix="/api/leaderboard")


def _resolver():
    """The checkpoint folder a job's model name stands for (None for built-in, API and
    hub models, and for folders that are gone): merges a model named by path and by
    its folder name under LBS_MODEL_DIRS."""
    settings = current_app.extensions["lbs"].settings

    def resolve(name: str) -> Path | None:
        for confine in (True, False):
            try:
                spec = resolve_model(name, settings, confine=confine)
            except ModelNotFound:
                continue
            return spec.path if spec.path and not spec.hub_id and not spec.builtin else None
        return None
    return resolve


@bp.get("")
@documented("models x datasets from the newest succeeded job of each: score, peak memory, "
            "tokens/s, duration", data={"rows": [{"type": "object"}],
                                          "models": [{"type": "object"}]})
def leaderboard():
    """Models x datasets from the newest succeeded job of each pair: score, peak memory,
    tokens/s, duration (see results.leaderboard)."""
    lbs = current_app.extensions["lbs"]
    return {"status": "success", "data": results.leaderboard(lbs.factory, _resolver())}


@bp.get("/memory")
@documented("peak memory per context length, per model, on NIAH and LongBench",
            data={"datasets": {"type": "object", "description": "dataset -> series of "
                               "{model, job_id, kind, points: [[length, bytes]]}"}})
def memory():
    """Peak memory against context length per model, on NIAH and LongBench."""
    lbs = current_app.extensions["lbs"]
    return {"status": "success", "data": results.memory_by_length(lbs.factory, _resolver())}
