"""/openapi.json, generated from the pydantic models that validate the requests."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from backend.api.memory import CleanupQuery, LimitQuery, ModelTarget, PinRequest, TimeoutRequest
from backend.api.schemas import (
    ErrorResponse,
    JobBatchRequest,
    JobListQuery,
    JobOut,
    JobRequest,
    JobSummary,
    SampleListQuery,
    SampleOut,
)
from backend.datasets.registry import dataset_names, get_dataset

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _success(data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["status", "data"],
            "properties": {"status": {"const": "success"},
                           "data": {"type": "object", "properties": data}}}


def _response(description: str, data: dict[str, Any] | None = None,
              errors: tuple[int, ...] = ()) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": description, "content": {
        "application/json": {"schema": _success(data or {})}}}}
    for code in errors:
        responses[str(code)] = {"description": "error", "content": {
            "application/json": {"schema": _ref(ErrorResponse)}}}
    return responses


def _query(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=REF)
    return [{"name": name, "in": "query", "required": False, "schema": prop}
            for name, prop in schema["properties"].items()]


def _job_id() -> dict[str, Any]:
    return {"name": "job_id", "in": "path", "required": True,
            "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}}


def build_spec() -> dict[str, Any]:
    models = [JobRequest, JobBatchRequest, JobOut, JobSummary, SampleOut, ErrorResponse,
              ModelTarget, PinRequest, TimeoutRequest]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas = defs.get("$defs", {})
    for name in dataset_names():
        params = get_dataset(name).Params
        schemas.update(params.model_json_schema(ref_template=REF).pop("$defs", {}))
        schemas[f"{name}.params"] = params.model_json_schema(ref_template=REF)
    job = {"job": _ref(JobOut)}
    submit_body = {"oneOf": [_ref(JobRequest), _ref(JobBatchRequest)]}
    submit = _response("the queued job(s)", {"job": _ref(JobOut),
                                             "jobs": {"type": "array", "items": _ref(JobOut)}},
                       (400, 403, 413, 422))
    submit["201"] = submit.pop("200")
    paths = {
        "/healthz": {"get": {"summary": "liveness", "responses": _response("ok")}},
        "/api/datasets": {"get": {"summary": "datasets with parameter schemas and data "
                                             "status (ready/missing, where, items, how to "
                                             "get it)",
                                  "responses": _response("datasets")}},
        "/api/datasets/{name}/fetch": {
            "post": {"summary": "fetch a dataset's official data from the Hugging Face hub "
                                "into this machine's cache (LBS_ALLOW_DATA_DOWNLOAD=1); body "
                                "{subsets?: [...]}; progress in GET /api/datasets",
                     "parameters": [{"name": "name", "in": "path", "required": True,
                                     "schema": {"type": "string"}}],
                     "responses": {("202" if k == "200" else k): v for k, v in _response(
                         "the fetch started", {"dataset": {"type": "string"},
                                               "fetch": {"type": "object"}},
                         (403, 404, 422)).items()}},
        },
        "/api/workers": {"get": {"summary": "workers and their heartbeats",
                                 "responses": _response("workers")}},
        "/api/jobs": {
            "post": {"summary": "queue one job, or several with {jobs: [...]}",
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": submit_body}}},
                     "responses": submit},
            "get": {"summary": "list jobs, newest first", "parameters": _query(JobListQuery),
                    "responses": _response("a page of jobs (summaries: no params, events)", {
                        "jobs": {"type": "array", "items": _ref(JobSummary)},
                        "total": {"type": "integer"}}, (422,))},
        },
        "/api/jobs/estimate": {
            "post": {"summary": "check jobs and estimate their memory and duration without "
                                "queueing them (same body and errors as a submission)",
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": submit_body}}},
                     "responses": _response("per job memory_bytes and duration; live workers",
                                            None, (400, 403, 422))},
        },
        "/api/leaderboard": {"get": {
            "summary": "models x datasets from the newest succeeded job of each: score, peak "
                       "memory, tokens/s, duration", "responses": _response("rows")}},
        "/api/leaderboard/memory": {"get": {
            "summary": "peak memory per context length, per model, on NIAH and LongBench",
            "responses": _response("series per dataset")}},
        "/api/jobs/{job_id}": {
            "get": {"summary": "one job with progress, scores and memory",
                    "parameters": [_job_id()], "responses": _response("the job", job, (404,))},
            "delete": {"summary": "delete a job that is not running",
                       "parameters": [_job_id()],
                       "responses": _response("deleted", None, (404, 409))},
        },
        "/api/jobs/{job_id}/samples": {
            "get": {"summary": "per-sample results", "parameters": [_job_id(),
                                                                   *_query(SampleListQuery)],
                    "responses": _response("samples", {
                        "samples": {"type": "array", "items": _ref(SampleOut)}}, (404, 422))},
        },
        "/api/jobs/{job_id}/export": {
            "get": {"summary": "the job and its samples as a JSON file, or the samples as CSV",
                    "parameters": [_job_id(), {
                        "name": "format", "in": "query", "required": False,
                        "schema": {"type": "string", "enum": ["json", "csv"],
                                   "default": "json"}}],
                    "responses": {
                        "200": {"description": "a file download", "content": {
                            "application/json": {"schema": {"type": "object"}},
                            "text/csv": {"schema": {"type": "string"}}}},
                        **{str(code): {"description": "error", "content": {"application/json": {
                            "schema": _ref(ErrorResponse)}}} for code in (404, 422)}}},
        },
        "/api/jobs/{job_id}/cancel": {
            "post": {"summary": "cancel a queued job, or stop a running one between samples",
                     "parameters": [_job_id()],
                     "responses": _response("the job", job, (404, 409))},
        },
    }
    paths.update(_memory_paths())
    return {"openapi": "3.1.0",
            "info": {"title": "LLM Bench Shower", "version": "0.1.0"},
            "paths": paths, "components": {"schemas": schemas}}


def _body(model: type[BaseModel], required: bool = False) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(model)}}}


def _memory_paths() -> dict[str, Any]:
    commands = (503, 504)
    get = {
        "/api/v1/memory/stats": "usage, limit, pressure and system RAM, summed over the "
                                "workers with a fresh heartbeat; per worker as_of and stale",
        "/api/v1/memory/pressure": "memory pressure and the models to unload, LRU first",
        "/api/v1/memory/models": "every loaded model: worker, location, size, load count, "
                                 "pins, as_of (when its worker took the status), stale",
        "/api/v1/memory/system": "RAM and swap of the server's machine",
        "/api/gpu/status": "per model: location, idle time, idle timeout, GPU memory, "
                           "as_of, stale",
    }
    paths: dict[str, Any] = {p: {"get": {"summary": s, "responses": _response(s)}}
                             for p, s in get.items()}
    paths["/api/v1/memory/cleanup"] = {"post": {
        "summary": "unload LRU unpinned models while there is pressure",
        "parameters": _query(CleanupQuery), "responses": _response("unloaded", None,
                                                                   (422, *commands))}}
    paths["/api/v1/memory/limit"] = {"post": {
        "summary": "set MAX_MEMORY_USAGE on every worker", "parameters": _query(LimitQuery),
        "responses": _response("the new limit", None, (422, *commands))}}
    for name, model, summary in (
            ("/api/v1/memory/pin", PinRequest, "pin a model: never evicted or idle-released"),
            ("/api/v1/memory/unpin", PinRequest, "unpin a model"),
            ("/api/gpu/offload", ModelTarget, "offload a model (or all) to CPU RAM"),
            ("/api/gpu/release", ModelTarget, "release a model (or all) fully"),
            ("/api/gpu/timeout", TimeoutRequest, "change the GPU idle timeout at run time")):
        paths[name] = {"post": {"summary": summary,
                                "requestBody": _body(model, model is not ModelTarget),
                                "responses": _response(summary, None,
                                                       (404, 409, 422, *commands))}}
    for name in ("/api/v1/memory/limit", "/api/gpu/timeout"):  # operator settings
        paths[name]["post"]["responses"]["202"] = {
            "description": "stored; no worker is running yet: each applies it as it starts",
            "content": {"application/json": {"schema": _success({})}}}
    return paths


@bp.get("/openapi.json")
def openapi():
    return build_spec()
