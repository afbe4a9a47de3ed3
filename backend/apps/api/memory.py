"""/api/v1/memory/* and /api/gpu/*: the workers' model managers, as in seeds 002 and 004.

Reads come from the status each worker publishes; changes are commands the
workers apply (backend.queue.control). With several workers every answer says which
worker holds what. Each status says when it was taken (`as_of`) and whether its
worker's heartbeat is stale (`stale`: it may no longer be true, and the totals
leave it out).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import psutil
from flask import Blueprint, current_app, request
from pydantic import BaseModel, ConfigDict, Field

from backend.apps.api.errors import ApiError
from backend.apps.api.openapi import documented
from backend.apps.api.schemas import MIN_TIMEOUT_S, Query
from backend.common.units import GiB, format_bytes
from backend.queue import control

bp = Blueprint("memory", __name__)


def _formatted(nbytes: float) -> str:
    """A size in the brief's response shape: "8.00 GB" for 8589934592 bytes."""
    return format_bytes(nbytes, brief_labels=True)


MAX_TIMEOUT = 7 * 24 * 3600


class _Strict(BaseModel):
    """A request body: no coercion ("300" is not 300)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)


_Query = Query
"""Query-string parameters (text, parsed into plain numbers and booleans)."""


class ModelTarget(_Strict):
    model: str | None = Field(None, min_length=1, max_length=1024,
                              description="a model name; every model when left out")
    worker: str | None = Field(None, max_length=128, description="one worker; all when left out")


class PinRequest(_Strict):
    model: str = Field(min_length=1, max_length=1024)
    worker: str | None = Field(None, max_length=128)


class TimeoutRequest(_Strict):
    timeout: float = Field(ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT,
                           description="GPU idle timeout in seconds")
    worker: str | None = Field(None, max_length=128)


MIN_LIMIT_GB = 0.1


class LimitQuery(_Query):
    limit_gb: float = Field(ge=MIN_LIMIT_GB, le=1_000_000,
                            description=f"MAX_MEMORY_USAGE in GB of 2**30 bytes (at least "
                                        f"{MIN_LIMIT_GB}: less would refuse every model)")


class CleanupQuery(_Query):
    force: bool = Field(False, description="unload every unpinned idle model, not only "
                                           "while there is pressure")


def _ok(data: Any) -> dict[str, Any]:
    return {"status": "success", "data": data}


def _state():
    return current_app.extensions["lbs"]


def _statuses() -> list[control.Published]:
    return _state().queue.commands.statuses()


def _fresh() -> list[tuple[Any, dict[str, Any]]]:
    """(worker, status) of the workers whose heartbeat is fresh."""
    return [(p.worker, p.status) for p in _statuses() if not p.stale]


def _body(model: type[BaseModel]) -> BaseModel:
    raw = request.get_json(silent=True) if request.data else {}
    if not isinstance(raw, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object",
                       [{"field": "body", "message": "expected a JSON object"}])
    return model.model_validate(raw)


def _setting(command: str, args: dict[str, Any], worker: str | None
             ) -> tuple[list[dict[str, Any]], int]:
    """An operator setting (timeout, limit) for every worker: stored first (workers
    apply it as they start), then sent to the live ones. (answers, status): 200 when
    live workers applied it, 202 when none is running yet."""
    if worker is not None:
        return _send(command, args, worker), 200
    _state().queue.commands.store_setting(command, args)
    try:
        return _send(command, args, None), 200
    except ApiError as exc:
        if exc.code in ("no_worker", "worker_timeout"):
            return [], 202
        raise


def _send(command: str, args: dict[str, Any], worker: str | None) -> list[dict[str, Any]]:
    try:
        answers = _state().queue.commands.send(command, args, worker)
    except control.NoWorker as exc:
        raise ApiError(503, "no_worker", str(exc))
    except control.CommandTimeout as exc:
        raise ApiError(504, "worker_timeout", str(exc))
    if not any(a["ok"] for a in answers):
        errors = [a["error"] or "" for a in answers]
        kind, _, message = errors[0].partition(": ")
        status = {"unknown_model": 404, "busy": 409, "memory_limit": 409}.get(kind, 500)
        field = "model" if kind == "unknown_model" else None
        raise ApiError(status, kind or "worker_error", message or errors[0],
                       [{"field": field, "message": message}] if field else [])
    return answers


def _pending(status: int, stored: bool = True) -> dict[str, Any]:
    if status != 202:
        return {"stored": stored}
    return {"stored": stored, "message": "no worker is running yet: the setting is stored "
                                       "and every worker applies it as it starts"}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _when(published: control.Published) -> dict[str, Any]:
    """When the status was taken, and whether its worker's heartbeat is stale."""
    return {"as_of": _iso(published.status.get("as_of")), "stale": published.stale}


def _model_rows() -> list[dict[str, Any]]:
    rows = []
    for p in _statuses():
        for m in p.status["models"]:
            rows.append({**m, "worker_id": p.worker.id, "last_access": _iso(m["last_access"]),
                         "loaded_at": _iso(m["loaded_at"]), **_when(p)})
    return rows


COMMANDS = (503, 504)
"""A memory command's own errors: no live worker, or one that did not answer in time."""
SETTING_STORED = {202: "stored; no worker is running yet: each applies it as it starts"}
_OBJECTS = [{"type": "object"}]
_ANSWERS = {"workers": [{"type": "object", "description": "per worker: worker_id, ok, "
                                                          "result, error"}]}

# --- /api/v1/memory ---------------------------------------------------------------

def _idle_timeout(statuses: list[tuple[Any, dict[str, Any]]]) -> float:
    """The GPU idle timeout in force, loaded model or not: a live worker's, else the
    operator's stored value (workers apply it as they start), else GPU_IDLE_TIMEOUT."""
    if statuses:
        return statuses[0][1]["idle_timeout_seconds"]
    stored = dict(_state().queue.commands.stored()).get("timeout")
    return stored["timeout"] if stored else _state().settings.gpu_idle_timeout


@bp.get("/api/v1/memory/stats")
@documented("usage, limit, pressure and system RAM, summed over the workers with a fresh "
            "heartbeat; the GPU idle timeout in force; per worker as_of and stale",
            data={"total_memory_usage": {"type": "integer"}, "memory_limit": {"type": "integer"},
                  "memory_pressure": {"type": "boolean"},
                  "idle_timeout_seconds": {"type": "number"}, "workers": _OBJECTS})
def stats():
    published = _statuses()
    statuses = [(p.worker, p.status) for p in published if not p.stale]
    usage = sum(s["total_memory_usage"] for _, s in statuses)
    limit = sum(s["memory_limit"] for _, s in statuses)
    vm = psutil.virtual_memory()
    available = min((s["system_available"] for _, s in statuses), default=vm.available)
    total = max((s["system_total"] for _, s in statuses), default=vm.total)
    return _ok({
        "total_models": sum(s["total_models"] for _, s in statuses),
        "total_memory_usage": usage, "formatted_usage": _formatted(usage),
        "memory_limit": limit, "formatted_limit": _formatted(limit),
        "memory_pressure": any(s["pressure"]["memory_pressure"] for _, s in statuses),
        "system_available": available, "formatted_system_available": _formatted(available),
        "system_total": total, "formatted_system_total": _formatted(total),
        "idle_timeout_seconds": _idle_timeout(statuses),
        "as_of": _iso(min((s["as_of"] for _, s in statuses if "as_of" in s), default=None)),
        "workers": [{"worker_id": p.worker.id, "total_models": p.status["total_models"],
                     "total_memory_usage": p.status["total_memory_usage"],
                     "memory_limit": p.status["memory_limit"],
                     "memory_pressure": p.status["pressure"]["memory_pressure"], **_when(p)}
                    for p in published],
    })


@bp.get("/api/v1/memory/pressure")
@documented("memory pressure and the models to unload, LRU first",
            data={"memory_pressure": {"type": "boolean"}, "reasons": [{"type": "string"}],
                  "recommended_unload": _OBJECTS, "workers": _OBJECTS})
def pressure():
    statuses = _fresh()
    return _ok({
        "memory_pressure": any(s["pressure"]["memory_pressure"] for _, s in statuses),
        "reasons": [f"{w.id}: {r}" for w, s in statuses for r in s["pressure"]["reasons"]],
        "recommended_unload": [{"model_name": name, "worker_id": w.id}
                               for w, s in statuses
                               for name in s["pressure"]["recommended_unload"]],
        "workers": [{"worker_id": w.id, **s["pressure"]} for w, s in statuses],
    })


@bp.post("/api/v1/memory/cleanup")
@documented("unload LRU unpinned models while there is pressure", query=CleanupQuery,
            data={"unloaded": _OBJECTS, "freed_bytes": {"type": "integer"}, **_ANSWERS},
            errors=(422, *COMMANDS))
def cleanup():
    query = CleanupQuery.model_validate(request.args.to_dict())
    answers = _send("cleanup", {"force": query.force}, None)
    freed = sum(a["result"]["freed_bytes"] for a in answers if a["ok"])
    return _ok({"unloaded": [{"model_name": name, "worker_id": a["worker_id"]}
                             for a in answers if a["ok"] for name in a["result"]["unloaded"]],
                "freed_bytes": freed, "formatted_freed": _formatted(freed),
                "workers": answers})


@bp.get("/api/v1/memory/models")
@documented("every loaded model: worker, location, size, load count, pins, as_of (when its "
            "worker took the status), stale", data={"models": _OBJECTS})
def models():
    return _ok({"models": _model_rows()})


@bp.post("/api/v1/memory/limit")
@documented("set MAX_MEMORY_USAGE on every worker", query=LimitQuery,
            data={"memory_limit": {"type": "integer"}, "stored": {"type": "boolean"},
                  **_ANSWERS}, errors=(422, *COMMANDS), also=SETTING_STORED)
def limit():
    query = LimitQuery.model_validate(request.args.to_dict())
    nbytes = int(query.limit_gb * GiB)
    answers, status = _setting("limit", {"bytes": nbytes}, None)
    return _ok({"memory_limit": nbytes, "formatted_limit": _formatted(nbytes),
                "workers": answers, **_pending(status)}), status


@bp.get("/api/v1/memory/system")
@documented("RAM and swap of the server's machine",
            data={"memory": {"type": "object"}, "swap": {"type": "object"}})
def system():
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    return _ok({
        "memory": {"total": vm.total, "available": vm.available, "used": vm.total - vm.available,
                   "percent": vm.percent, "formatted_total": _formatted(vm.total),
                   "formatted_available": _formatted(vm.available)},
        "swap": {"total": swap.total, "used": swap.used, "free": swap.free,
                 "percent": swap.percent, "formatted_total": _formatted(swap.total)},
    })


@bp.post("/api/v1/memory/pin")
@documented("pin a model: never evicted or idle-released", body=PinRequest,
            data={"model": {"type": "string"}, "pinned": {"const": True}, **_ANSWERS},
            errors=(404, 409, 422, *COMMANDS))
def pin():
    body = _body(PinRequest)
    return _ok({"workers": _send("pin", {"model": body.model}, body.worker),
                "model": body.model, "pinned": True})


@bp.post("/api/v1/memory/unpin")
@documented("unpin a model", body=PinRequest,
            data={"model": {"type": "string"}, "pinned": {"const": False}, **_ANSWERS},
            errors=(404, 409, 422, *COMMANDS))
def unpin():
    body = _body(PinRequest)
    return _ok({"workers": _send("unpin", {"model": body.model}, body.worker),
                "model": body.model, "pinned": False})


# --- /api/gpu: status, offload, release, idle timeout -----------------------------

_LOCATION = {"gpu": "GPU", "cpu": "CPU", "loading": "loading", "unloaded": "unloaded"}


@bp.get("/api/gpu/status")
@documented("per model (the keys of `data`): location, idle time, idle timeout, GPU memory, "
            "as_of, stale")
def gpu_status():
    data: dict[str, Any] = {}
    for p in sorted(_statuses(), key=lambda p: p.stale):  # a live worker's model keeps its name
        worker, status = p.worker, p.status
        for m in status["models"]:
            key = m["model_name"] if m["model_name"] not in data \
                else f"{m['model_name']} ({worker.id})"
            data[key] = {
                "model_name": m["model_name"], "location": _LOCATION[m["location"]],
                "idle_time_seconds": m["idle_time_seconds"],
                "idle_timeout_seconds": status["idle_timeout_seconds"],
                "monitor_running": status["monitor_running"],
                "gpu_memory": status["gpu_memory"], "pinned": m["pinned"],
                "worker_id": worker.id, **_when(p),
            }
    return _ok(data)


@bp.post("/api/gpu/offload")
@documented("offload a model (or all) to CPU RAM", body=ModelTarget, body_required=False,
            data={"offloaded": _OBJECTS, **_ANSWERS}, errors=(404, 409, 422, *COMMANDS))
def gpu_offload():
    body = _body(ModelTarget)
    answers = _send("offload", {"model": body.model}, body.worker)
    return _ok({"offloaded": [e for a in answers if a["ok"] for e in a["result"]["offloaded"]],
                "workers": answers})


@bp.post("/api/gpu/release")
@documented("release a model (or all) fully", body=ModelTarget, body_required=False,
            data={"released": _OBJECTS, "freed_rss_bytes": {"type": "integer"},
                  **_ANSWERS}, errors=(404, 409, 422, *COMMANDS))
def gpu_release():
    body = _body(ModelTarget)
    answers = _send("release", {"model": body.model}, body.worker)
    freed = sum(a["result"]["freed_rss_bytes"] for a in answers if a["ok"])
    return _ok({"released": [e for a in answers if a["ok"] for e in a["result"]["released"]],
                "freed_rss_bytes": freed, "freed_rss_mb": round(freed / 2**20, 1),
                "workers": answers})


@bp.post("/api/gpu/timeout")
@documented("change the GPU idle timeout at run time", body=TimeoutRequest,
            data={"idle_timeout_seconds": {"type": "number"}, "stored": {"type": "boolean"},
                  **_ANSWERS}, errors=(404, 409, 422, *COMMANDS), also=SETTING_STORED)
def gpu_timeout():
    body = _body(TimeoutRequest)
    answers, status = _setting("timeout", {"timeout": body.timeout}, body.worker)
    return _ok({"idle_timeout_seconds": body.timeout, "workers": answers,
                **_pending(status, body.worker is None)}), status
