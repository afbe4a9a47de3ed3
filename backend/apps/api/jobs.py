"""/api/jobs: submit, list, read, cancel and delete evaluation jobs.

JobNotFound and JobConflict from the service become 404 and 409 in errors.py.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, request, stream_with_context
from pydantic import ValidationError

from backend.apps.api.errors import ApiError, validation_details
from backend.apps.api.openapi import documented
from backend.apps.api.schemas import (
    SUMMARY_EXCLUDE,
    ExportQuery,
    JobBatchRequest,
    JobListQuery,
    JobOut,
    JobRequest,
    JobSummary,
    SampleListQuery,
    SampleOut,
    job_out,
    sample_out,
    shard_out,
)
from backend.common.redact import csv_cell
from backend.common.secrets_box import encrypt
from backend.datasets.hub import DataMissing, FetchPending
from backend.datasets.registry import UnknownDataset, get_dataset
from backend.engine.contracts import (
    JobFieldError,
    JobFieldRefused,
    ModelNotFound,
    ModelPathRefused,
    ParamError,
    PathRefused,
)
from backend.engine.preparation import prepare
from backend.queue import results
from backend.queue.jobs import NewJob, Queue

bp = Blueprint("jobs", __name__, url_prefix="/api/jobs")


def _queue() -> Queue:
    return current_app.extensions["lbs"].queue


def _ok(data: Any, status: int = 200):
    return {"status": "success", "data": data}, status


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object",
                       [{"field": "body", "message": "expected a JSON object"}])
    return body


def _check(job: JobRequest, prefix: str) -> NewJob:
    """Refuse the job now, naming the field, if it cannot run."""
    settings = current_app.extensions["lbs"].settings
    try:
        # a sharded model needs room on each GPU
        prepared = prepare(job.model, job.dataset, job.params, settings, api=job.api,
                           num_gpus=job.num_gpus)
        # reads the dataset's prompts (their lengths): a bad file is a 422 like in check
        try:
            memory = prepared.runner.estimate_job_bytes(prepared, settings)
        except FetchPending:  # no prompts to measure until the worker fetches the data:
            memory = None     # unknown, admitted anywhere (like a model not downloaded)
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
        shards = _queue().workers.idle_count(job.worker_label, job.num_gpus)
    if shards > 1 and prepared.params.methods:
        message = "a comparison of methods runs on one worker; use data_parallel 1"
        raise ApiError(422, "invalid_job", f"{prefix}data_parallel: {message}",
                       [{"field": f"{prefix}data_parallel", "message": message}])
    return NewJob(model=job.model, dataset=job.dataset, params=params,
                  timeout_s=job.timeout_s, priority=job.priority,
                  submitter=job.submitter or "anonymous",
                  worker_label=job.worker_label, num_gpus=job.num_gpus,
                  memory_bytes=memory, data_parallel=shards,
                  api=prepared.api.public() if prepared.api is not None else None,
                  api_key_encrypted=encrypt(settings, prepared.api_key)
                  if job.api is not None and job.api.api_key is not None else None)


WORKER_START_GRACE_S = 180.0
"""How long after this server started a worker process a job without a live worker
is said to wait for it to start (loading torch and registering takes a while)."""


def _out(jobs: list[Any], summary: bool = False) -> list[dict[str, Any]]:
    """Jobs as the API shows them, a queued job with the reason it waits; `summary`
    leaves out params and events (lists)."""
    lbs = current_app.extensions["lbs"]
    reasons = lbs.queue.waiting_reasons(jobs)
    spawned = lbs.workers_spawned_at
    if spawned is not None and time.monotonic() - spawned < WORKER_START_GRACE_S:
        since = round(time.monotonic() - spawned)
        reasons = {i: f"the worker is starting (started {since} s ago); the job runs once "
                      "it is ready" if r.startswith("no live worker") else r
                   for i, r in reasons.items()}
    exclude = SUMMARY_EXCLUDE if summary else None
    return [job_out(j, reasons.get(j.id), summary).model_dump(mode="json", exclude=exclude)
            for j in jobs]


_JOB_BODY = (JobRequest, JobBatchRequest)


@bp.post("")
@documented("queue one job, or several with {jobs: [...]}", body=_JOB_BODY,
            data={"job": JobOut, "jobs": [JobOut]}, status=201,
            errors=(400, 403, 413, 422, 429))
def submit():
    body = _json_body()
    if "jobs" in body:
        batch = JobBatchRequest.model_validate(body)
        new = [_check(job, f"jobs[{i}].") for i, job in enumerate(batch.jobs)]
        created = _queue().submit(new)
        return _ok({"jobs": _out(created)}, 201)
    new = [_check(JobRequest.model_validate(body), "")]
    created = _queue().submit(new)
    return _ok({"job": _out(created)[0]}, 201)


@bp.post("/estimate")
@documented("check jobs and estimate their memory and duration without queueing them "
            "(same body and errors as a submission)", body=_JOB_BODY,
            data={"jobs": [{"type": "object", "properties": {
                "model": {"type": "string"}, "dataset": {"type": "string"},
                "memory_bytes": {"type": ["integer", "null"]},
                "duration": {"type": ["object", "null"]}}}],
                  "workers": [{"type": "object"}]}, errors=(400, 403, 422))
def estimate():
    """What a submission would need, without queueing it: per job the checked
    parameters' memory estimate (the runner's estimate_job_bytes) and a rough duration
    from finished jobs, and the live workers' free GPU memory. Refuses bad jobs with
    the same 4xx errors as a submission, so a form can show them before launch."""
    body = _json_body()
    requests = JobBatchRequest.model_validate(body).jobs if "jobs" in body \
        else [JobRequest.model_validate(body)]
    lbs = current_app.extensions["lbs"]
    out = []
    for i, job in enumerate(requests):
        new = _check(job, f"jobs[{i}]." if "jobs" in body else "")
        items = _grid_size(job.dataset, new.params)
        out.append({"model": job.model, "dataset": job.dataset,
                    "memory_bytes": new.memory_bytes,
                    "duration": lbs.queue.rough_duration(job.model, job.dataset,
                                                         new.params, items)})
    return _ok({"jobs": out,
                "workers": lbs.queue.workers.live()})


def _grid_size(dataset: str, params: dict[str, Any]) -> int | None:
    """Items of a job whose parameters say how many (NIAH's lengths x depths grid)."""
    try:
        dataset_obj = get_dataset(dataset)
        parsed = dataset_obj.parse_params(params)
    except (UnknownDataset, ValidationError):
        return None
    return dataset_obj.grid_size(parsed)


@bp.get("")
@documented("list jobs, newest first (summaries: no params, events)", query=JobListQuery,
            data={"jobs": [JobSummary], "page": {"type": "integer"},
                  "per_page": {"type": "integer"}, "total": {"type": "integer"}},
            errors=(422,))
def list_jobs():
    query = JobListQuery.model_validate(request.args.to_dict())
    jobs, total = _queue().list(
        state=query.state.value if query.state else None, model=query.model,
        dataset=query.dataset, submitter=query.submitter,
        offset=(query.page - 1) * query.per_page, limit=query.per_page)
    return _ok({"jobs": _out(jobs, summary=True),
                "page": query.page, "per_page": query.per_page, "total": total})


@bp.get("/<int(min=1, max=9223372036854775807):job_id>")
@documented("one job with progress, scores and memory", data={"job": JobOut},
            errors=(404,))
def get_job(job_id: int):
    job = _queue().get(job_id)
    out = _out([job])[0]
    if job.shard_count and job.parent_id is None:  # a data-parallel job: its shards too
        shards = _queue().shards(job_id)
        reasons = _queue().waiting_reasons(shards)
        out["shards"] = [shard_out(s, reasons.get(s.id), job.progress_total)
                         .model_dump(mode="json")
                         for s in shards]
    return _ok({"job": out})


@bp.get("/<int(min=1, max=9223372036854775807):job_id>/samples")
@documented("per-sample results", query=SampleListQuery,
            data={"samples": [SampleOut], "page": {"type": "integer"},
                  "per_page": {"type": "integer"}, "total": {"type": "integer"}},
            errors=(404, 422))
def samples(job_id: int):
    query = SampleListQuery.model_validate(request.args.to_dict())
    rows, total = _queue().samples(job_id, offset=(query.page - 1) * query.per_page,
                                   limit=query.per_page)
    return _ok({"samples": [sample_out(s).model_dump(mode="json") for s in rows],
                "page": query.page, "per_page": query.per_page, "total": total})


@bp.post("/<int(min=1, max=9223372036854775807):job_id>/cancel")
@documented("cancel a queued job, or stop a running one between samples",
            data={"job": JobOut}, errors=(404, 409))
def cancel(job_id: int):
    _queue().cancel(job_id)
    return _ok({"job": job_out(_queue().get(job_id)).model_dump(mode="json")})


@bp.delete("/<int(min=1, max=9223372036854775807):job_id>")
@documented("delete a job that is not running", data={"deleted": {"type": "integer"}},
            errors=(404, 409))
def delete(job_id: int):
    _queue().delete(job_id)
    return _ok({"deleted": job_id})


@bp.get("/<int(min=1, max=9223372036854775807):job_id>/export")
@documented("the job and its samples as a JSON file, the samples as CSV, or the scores "
            "in lm-eval's results format",
            query=ExportQuery, errors=(404, 422), responses={"200": {
                "description": "a file download", "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/csv": {"schema": {"type": "string"}}}}})
def export(job_id: int):
    """The job and all its samples as JSON, or the samples as CSV (?format=csv). Both
    carry each sample's reference, extracted answer, why, and the dataset's own columns;
    both are streamed, a page of samples at a time, never built whole in memory."""
    fmt = ExportQuery.model_validate(request.args.to_dict()).format
    queue = _queue()
    job = job_out(queue.get(job_id)).model_dump(mode="json")
    name = f"job-{job_id}-{job['dataset']}"
    try:
        dataset = get_dataset(job["dataset"])
        own, per_task = [c["key"] for c in dataset.sample_columns], bool(dataset.tasks_param)
    except UnknownDataset:  # a plugin that is gone: its fields stay in `fields`
        own, per_task = [], False
    if fmt == "lm_eval":
        return Response(json.dumps(results.lm_eval_results(job, per_task), ensure_ascii=False,
                                   indent=2),
                        mimetype="application/json", headers={
                            "Content-Disposition": f"attachment; filename={name}-lm_eval.json"})
    if fmt == "json":
        return Response(stream_with_context(_json_chunks(queue, job_id, job)),
                        mimetype="application/json",
                        headers={"Content-Disposition": f"attachment; filename={name}.json"})
    return Response(stream_with_context(_csv_chunks(queue, job_id, own)), mimetype="text/csv",
                    headers={"Content-Disposition": f"attachment; filename={name}.csv"})


EXPORT_PAGE = 500


def _exported_samples(queue: Queue, job_id: int) -> Iterator[dict[str, Any]]:
    """Every sample of the job as the API shows it, read a page at a time."""
    offset = 0
    while True:
        rows, _ = queue.samples(job_id, offset=offset, limit=EXPORT_PAGE)
        for row in rows:
            yield sample_out(row).model_dump(mode="json")
        if len(rows) < EXPORT_PAGE:
            return
        offset += EXPORT_PAGE


def _json_chunks(queue: Queue, job_id: int, job: dict[str, Any]) -> Iterator[str]:
    yield '{"job": ' + json.dumps(job, ensure_ascii=False) + ', "samples": ['
    for i, sample in enumerate(_exported_samples(queue, job_id)):
        yield ("," if i else "") + "\n" + json.dumps(sample, ensure_ascii=False)
    yield "\n]}\n"


CSV_COLUMNS = ["idx", "prompt_tokens", "score", "reference", "extracted", "why", "latency_s",
               "output_tokens", "peak_rss_mb", "peak_own_rss_mb",
               "peak_gpu_mb", "prediction", "prompt", "error"]
"""Every job's columns; the dataset's own (`sample_columns`: NIAH's context length and
depth, C-Eval's subject…) come after `idx`, and only that dataset's."""


def _csv_cell(value: Any) -> Any:
    """Lists and objects (several reference answers, choice log-likelihoods) as JSON."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value


def _csv_chunks(queue: Queue, job_id: int, own: list[str]) -> Iterator[str]:
    extra = [c for c in own if c not in CSV_COLUMNS]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS[:1] + extra + CSV_COLUMNS[1:],
                            extrasaction="ignore")
    writer.writeheader()
    for sample in _exported_samples(queue, job_id):
        fields = sample["fields"]
        row = {**sample, **{k: fields.get(k) for k in ("reference", "extracted", "why")},
               **{k: fields.get(k) for k in extra}}
        writer.writerow({k: csv_cell(_csv_cell(v)) for k, v in row.items()})
        yield out.getvalue()
        out.seek(0)
        out.truncate()
