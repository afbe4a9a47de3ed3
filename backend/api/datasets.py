"""/api/datasets: the datasets a job can name, with their parameter schemas."""

from __future__ import annotations

from flask import Blueprint

from backend.datasets.registry import dataset_names, get_dataset

bp = Blueprint("datasets", __name__, url_prefix="/api/datasets")


@bp.get("")
def list_datasets():
    datasets = [get_dataset(name).describe() for name in dataset_names()]
    return {"status": "success", "data": {"datasets": datasets}}
