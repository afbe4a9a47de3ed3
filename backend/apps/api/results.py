"""/api/leaderboard: results across jobs (models x datasets, memory against length)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, current_app

from backend.apps.api import schemas
from backend.apps.api.openapi import documented
from backend.datasets.registry import UnknownDataset, dataset_names, get_dataset
from backend.engine.contracts import ModelNotFound
from backend.runners.models import resolve_model
from backend.runners.registry import get_runner

bp = Blueprint("results", __name__, url_prefix="/api/leaderboard")


def _resolver():
    """The checkpoint folder a job's model name stands for, as its runner says
    (`Runner.model_folder`: None for built-in, API and hub models, whose name is their
    identity), None for folders that are gone: merges a model named by path and by its
    folder name under LBS_MODEL_DIRS."""
    settings = current_app.extensions["lbs"].settings

    def resolve(name: str) -> Path | None:
        for confine in (True, False):
            try:
                spec = resolve_model(name, settings, confine=confine)
            except ModelNotFound:
                continue
            return get_runner(spec.runner).model_folder(spec)
        return None
    return resolve


def tasks_param(dataset: str) -> str | None:
    """The parameter naming the several tasks one job of `dataset` runs, each scored on
    its own (`Dataset.tasks_param`); None for a one-task dataset or one since removed."""
    try:
        return get_dataset(dataset).tasks_param
    except UnknownDataset:
        return None


def length_datasets() -> tuple[str, ...]:
    """The datasets whose samples span lengths (`Dataset.length_axis`): those whose
    lengths form a grid first, then by name."""
    axes = {name: get_dataset(name).length_axis for name in dataset_names()}
    return tuple(sorted((name for name, axis in axes.items() if axis is not None),
                        key=lambda name: (not axes[name].series, name)))


def effective_params(dataset: str, params: dict[str, Any]) -> dict[str, Any]:
    """A job's parameters with the dataset's defaults filled in, so a default left out
    and the same value given are one configuration (as sent, for a dataset since
    removed or parameters since renamed)."""
    return schemas.effective_params(dataset, params) or params


@bp.get("")
@documented("one row per model and configuration (a dataset with its effective parameters; "
            "each lm-eval task and group of its own), from the newest succeeded run: score "
            "with stderr and 95% interval, peak memory, tokens/s, duration, runs, the "
            "parameters that set the row apart", data={"rows": [{"type": "object"}],
                                                         "models": [{"type": "object"}]})
def leaderboard():
    """One row per model and configuration (see results.leaderboard)."""
    lbs = current_app.extensions["lbs"]
    return {"status": "success",
            "data": lbs.results.leaderboard(_resolver(), effective_params, tasks_param)}


@bp.get("/memory")
@documented("peak memory per context length, per model, on the datasets whose samples "
            "span lengths (NIAH, LongBench: their `length_axis` in GET /api/datasets)",
            data={"datasets": {"type": "object", "description": "dataset -> series of "
                               "{model, job_id, kind, points: [[length, bytes]]}"}})
def memory():
    """Peak memory against context length per model, on the datasets that declare a
    length axis."""
    lbs = current_app.extensions["lbs"]
    return {"status": "success", "data": lbs.results.memory_by_length(_resolver(),
                                                                      length_datasets())}
