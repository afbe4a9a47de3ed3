"""/api/jobs: submit, list, read, cancel and delete evaluation jobs.

JobNotFound and JobConflict from the service become 404 and 409 in errors.py.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from flask import Blueprint, Response, current_app, request
from pydantic import ValidationError

from backend import jobs as service
from backend.admission import estimate_job_bytes
from backend.api.errors import ApiError, validation_details
from backend.api.schemas import (
    JobBatchRequest,
    JobListQuery,
    JobRequest,
    SampleListQuery,
    job_out,
    sample_out,
)
from backend.datasets.base import ParamError, PathRefused
from backend.datasets.hub import DataMissing
from backend.datasets.registry import UnknownDataset
from backend.evaluation import JobFieldError, JobFieldRefused, prepare
from backend.runners.models import ModelNotFound, ModelPathRefused
from backend.secrets_box import encrypt

bp = Blueprint("jobs", __name__, url_prefix="/api/jobs")


def _factory():
    return current_app.extensions["lbs"].factory


def _ok(data: Any, status: int = 200):
    return {"status": "success", "data": data}, status


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object",
                       [{"field": "body", "message": "expected a JSON object"}])
    return body


def _check(job: JobRequest, prefix: str) -> service.NewJob:
    """Refuse the job now, naming the field, if it cannot run."""
    settings = current_app.extensions["lbs"].settings
    try:
        prepared = prepare(job.model, job.dataset, job.params, settings, api=job.api)
    except JobFieldError as exc:
        field = f"{prefix}{exc.field}"
        status, code = (403, "path_refused") if isinstance(exc, JobFieldRefused) \
            else (422, "invalid_job")
        raise ApiError(status, code, f"{field}: {exc.message}",
                       [{"field": field, "message": exc.message}])
    except UnknownDataset as exc:
        raise ApiError(422, "unknown_dataset", str(exc),
                       [{"field": f"{prefix}dataset", "message": str(exc)}])
    except ModelPathRefused as exc:
        raise ApiError(403, "path_refused", str(exc),
                       [{"field": f"{prefix}model", "message": str(exc)}])
    except ModelNotFound as exc:
        raise ApiError(422, "model_not_found", str(exc),
                       [{"field": f"{prefix}model", "message": str(exc)}])
    except ValidationError as exc:
        details = validation_details(exc, f"{prefix}params")
        raise ApiError(422, "invalid_params",
                       "; ".join(f"{d['field']}: {d['message']}" for d in details), details)
    except ParamError as exc:
        field = f"{prefix}params.{exc.field}"
        if isinstance(exc, PathRefused):
            raise ApiError(403, "path_refused", f"{field}: {exc.message}",
                           [{"field": field, "message": exc.message}])
        if isinstance(exc, DataMissing):
            raise ApiError(422, "data_missing", f"{field}: {exc.message}",
                           [{"field": field, "message": exc.message}],
                           {"guidance": exc.guidance})
        raise ApiError(422, "invalid_params", f"{field}: {exc.message}",
                       [{"field": field, "message": exc.message}])
    params = prepared.params.model_dump(mode="json", exclude_unset=True)
    shards = job.data_parallel
    if shards == "auto":
        shards = service.idle_workers(_factory(), settings.lease_seconds, job.worker_label,
                                      job.num_gpus)
    if shards > 1 and getattr(prepared.params, "methods", None):
        message = "a comparison of methods runs on one worker; use data_parallel 1"
        raise ApiError(422, "invalid_job", f"{prefix}data_parallel: {message}",
                       [{"field": f"{prefix}data_parallel", "message": message}])
    memory = estimate_job_bytes(prepared.spec, prepared.params, prepared.info.max_length,
                                settings)
    return service.NewJob(model=job.model, dataset=job.dataset, params=params,
                          timeout_s=job.timeout_s, priority=job.priority,
                          submitter=job.submitter or "anonymous",
                          worker_label=job.worker_label, num_gpus=job.num_gpus,
                          memory_bytes=memory, data_parallel=shards,
                          api=prepared.api.public() if prepared.api is not None else None,
                          api_key_encrypted=encrypt(settings, prepared.api_key)
                          if job.api is not None and job.api.api_key is not None else None)


def _out(jobs: list[Any]) -> list[dict[str, Any]]:
    """Jobs as the API shows them, a queued job with the reason it waits."""
    lease = current_app.extensions["lbs"].settings.lease_seconds
    reasons = service.waiting_reasons(_factory(), jobs, lease)
    return [job_out(j, reasons.get(j.id)).model_dump(mode="json") for j in jobs]


@bp.post("")
def submit():
    body = _json_body()
    if "jobs" in body:
        batch = JobBatchRequest.model_validate(body)
        new = [_check(job, f"jobs[{i}].") for i, job in enumerate(batch.jobs)]
        created = service.submit_jobs(_factory(), new)
        return _ok({"jobs": _out(created)}, 201)
    new = [_check(JobRequest.model_validate(body), "")]
    created = service.submit_jobs(_factory(), new)
    return _ok({"job": _out(created)[0]}, 201)


@bp.get("")
def list_jobs():
    query = JobListQuery.model_validate(request.args.to_dict())
    jobs, total = service.list_jobs(
        _factory(), state=query.state.value if query.state else None, model=query.model,
        dataset=query.dataset, submitter=query.submitter,
        offset=(query.page - 1) * query.per_page, limit=query.per_page)
    return _ok({"jobs": _out(jobs),
                "page": query.page, "per_page": query.per_page, "total": total})


@bp.get("/<int(min=1, max=9223372036854775807):job_id>")
def get_job(job_id: int):
    return _ok({"job": _out([service.get_job(_factory(), job_id)])[0]})


@bp.get("/<int(min=1, max=9223372036854775807):job_id>/samples")
def samples(job_id: int):
    query = SampleListQuery.model_validate(request.args.to_dict())
    rows, total = service.list_samples(_factory(), job_id,
                                       offset=(query.page - 1) * query.per_page,
                                       limit=query.per_page)
    return _ok({"samples": [sample_out(s).model_dump(mode="json") for s in rows],
                "page": query.page, "per_page": query.per_page, "total": total})


@bp.post("/<int(min=1, max=9223372036854775807):job_id>/cancel")
def cancel(job_id: int):
    service.cancel_job(_factory(), job_id)
    return _ok({"job": job_out(service.get_job(_factory(), job_id)).model_dump(mode="json")})


@bp.delete("/<int(min=1, max=9223372036854775807):job_id>")
def delete(job_id: int):
    service.delete_job(_factory(), job_id)
    return _ok({"deleted": job_id})


@bp.get("/<int(min=1, max=9223372036854775807):job_id>/export")
def export(job_id: int):
    """The job and all its samples as JSON, or the samples as CSV (?format=csv)."""
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(422, "validation_error", "format must be json or csv",
                       [{"field": "format", "message": "expected json or csv"}])
    job = job_out(service.get_job(_factory(), job_id)).model_dump(mode="json")
    rows, _ = service.list_samples(_factory(), job_id, limit=10**9)
    samples = [sample_out(s).model_dump(mode="json") for s in rows]
    name = f"job-{job_id}-{job['dataset']}"
    if fmt == "json":
        body = json.dumps({"job": job, "samples": samples}, ensure_ascii=False, indent=2)
        return Response(body, mimetype="application/json", headers={
            "Content-Disposition": f"attachment; filename={name}.json"})
    out = io.StringIO()
    columns = ["idx", "context_length", "depth_percent", "prompt_tokens", "score",
               "latency_s", "output_tokens", "peak_rss_mb", "peak_gpu_mb", "prediction",
               "prompt", "error"]
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(samples)
    return Response(out.getvalue(), mimetype="text/csv", headers={
        "Content-Disposition": f"attachment; filename={name}.csv"})
