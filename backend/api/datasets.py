"""/api/datasets and /api/models: what a job can name."""

from __future__ import annotations

from flask import Blueprint, current_app

from backend.datasets.registry import dataset_names, get_dataset
from backend.runners.models import list_local_models

bp = Blueprint("datasets", __name__)


@bp.get("/api/datasets")
def list_datasets():
    datasets = [get_dataset(name).describe() for name in dataset_names()]
    return {"status": "success", "data": {"datasets": datasets}}


@bp.get("/api/models")
def list_models():
    dirs = current_app.extensions["lbs"].settings.model_dirs
    return {"status": "success", "data": {"models": list_local_models(dirs),
                                          "model_dirs": list(dirs)}}
