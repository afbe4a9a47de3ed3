"""/api/datasets and /api/models: what a job can name, and whether its data is ready.

Each dataset carries `data`: ready or missing, where, items per part, and how to get
it (hub id, the `data fetch` command, the folder to copy into). POST
/api/datasets/<name>/fetch starts `lbs data fetch <name>` as a
child process of the server (only with LBS_ALLOW_DATA_DOWNLOAD): the download runs
outside the server process, into this machine's Hugging Face cache, and its progress
(bytes) shows in `data.fetch` until it ends. Workers on this machine read that
cache; a worker on another machine fetches for itself when its first job needs the
data (LBS_ALLOW_DATA_DOWNLOAD there too).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from flask import Blueprint, current_app, request
from pydantic import BaseModel, Field, ValidationError

from backend.apps.api.errors import ApiError
from backend.apps.api.openapi import documented
from backend.apps.api.schemas import Query
from backend.datasets.base import DataContext
from backend.datasets.hub import fetch_command
from backend.datasets.registry import UnknownDataset, dataset_names, get_dataset
from backend.datasets.status import dataset_status
from backend.runners.models import list_local_models

log = logging.getLogger(__name__)
bp = Blueprint("datasets", __name__)


class FetchRequest(BaseModel):
    subsets: list[str] | None = Field(None, max_length=100,
                                      description="parts of the dataset; all when left out")


class Fetches:
    """The data fetches this server started: one child process per dataset at a time."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[subprocess.Popen, Path, float]] = {}
        self.lock = threading.Lock()

    def start(self, name: str, parts: list[str] | None, settings: Any) -> dict[str, Any]:
        with self.lock:
            running = self.procs.get(name)
            if running is not None and running[0].poll() is None:
                return self.state(name) or {}
            folder = settings.data_dir / "fetch"
            folder.mkdir(parents=True, exist_ok=True)
            progress = folder / f"{name}.json"
            progress.unlink(missing_ok=True)
            log_file = open(folder / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
            cmd = [sys.executable, "-m", "backend.apps.lbs", "data", "fetch", name,
                   "--progress-file", str(progress)]
            if parts:
                cmd += ["--subsets", *parts]
            env = settings.child_env()
            proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), stdout=log_file,
                                    stderr=subprocess.STDOUT)
            log_file.close()
            self.procs[name] = (proc, progress, time.time())
            log.info("[Server] fetching data for %s (pid %d)", name, proc.pid)
        return self.state(name) or {}

    def state(self, name: str) -> dict[str, Any] | None:
        entry = self.procs.get(name)
        if entry is None:
            return None
        proc, progress, started = entry
        try:
            state = json.loads(progress.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {"state": "running", "bytes_done": 0, "bytes_total": None}
        code = proc.poll()
        if code is not None and state.get("state") == "running":
            tail = (progress.parent / f"{name}.log").read_text(errors="replace")[-500:]
            state = {**state, "state": "failed", "error": tail.strip().splitlines()[-1]
                     if tail.strip() else f"exit status {code}"}
        state.pop("at", None)
        return {**state, "started_at": started}


def _fetches() -> Fetches:
    return current_app.extensions.setdefault("lbs_fetches", Fetches())


def describe(name: str) -> dict[str, Any]:
    settings = current_app.extensions["lbs"].settings
    ds = get_dataset(name, DataContext.of(settings))
    out = ds.describe()
    out["data"] = dataset_status(ds, settings.allow_data_download, settings.hub_offline)
    fetch = _fetches().state(name)
    if fetch is not None:
        out["data"]["fetch"] = fetch
    return out


@bp.get("/api/datasets")
@documented("datasets with parameter schemas and data status (ready/missing, where, items, "
            "how to get it)", data={"datasets": [{"type": "object"}]})
def list_datasets():
    datasets = [describe(name) for name in dataset_names()]
    return {"status": "success", "data": {"datasets": datasets}}


class TaskQuery(Query):
    q: str = Field("", max_length=200, description="words the task's name or hub dataset "
                                                   "contains (all of them)")
    kind: Literal["task", "py_task", "group", "tag"] | None = Field(
        None, description="only tasks, Python tasks, groups or tags")
    tag: str | None = Field(None, max_length=200, description="only tasks with this tag")
    group: str | None = Field(None, max_length=200,
                              description="only members of this group (at any level)")
    names: str | None = Field(None, max_length=20000,
                              description="exactly these names, comma-separated (e.g. a "
                                          "job's tasks, to show their data state)")
    offset: int = Field(0, ge=0, le=1_000_000)
    limit: int = Field(50, ge=1, le=500)


@bp.get("/api/lm_eval/tasks")
@documented("search lm-evaluation-harness tasks, groups and tags (lm-eval's own and "
            "LBS_LM_EVAL_INCLUDE_PATH's) by name, kind, tag or group, a page at a time, "
            "each with whether its data is here (data: state ready/missing/unknown, source "
            "hub/local, hub id and config, where) and, for a group or tag, the tasks it runs",
            query=TaskQuery,
            data={"status": {"type": "string", "description": "ready, or indexing (the "
                                                               "first request starts it)"},
                  "total": {"type": "integer"}, "offset": {"type": "integer"},
                  "limit": {"type": "integer"}, "tasks": [{"type": "object"}],
                  "downloads_allowed": {"type": "boolean"}},
            errors=(422,))
def search_lm_eval_tasks():
    from backend.datasets import lm_eval_catalog as catalog
    from backend.datasets.lm_eval_lookup import cached_task_list
    from backend.datasets.lm_eval_tasks import LmEvalTasks

    query = TaskQuery.model_validate(request.args.to_dict())
    settings = current_app.extensions["lbs"].settings
    tasks = LmEvalTasks(DataContext.of(settings))
    rows = cached_task_list(tasks.include_path, tasks.cache_dir)
    allowed = settings.allow_data_download and not settings.hub_offline
    base = {"offset": query.offset, "limit": query.limit, "downloads_allowed": allowed}
    if rows is None:
        return {"status": "success", "data": {"status": "indexing", "total": None,
                                              "tasks": [], **base}}
    index = catalog.by_name(rows)
    if query.names is not None:
        wanted = [n.strip() for n in query.names.split(",") if n.strip()]
        found = [index[n] for n in wanted if n in index]
        total, page = len(found), found[query.offset:query.offset + query.limit]
    else:
        total, page = catalog.search(rows, query.q, query.kind, query.tag, query.group,
                                     query.offset, query.limit)
    tasks = []
    for row in page:
        out = {k: v for k, v in row.items() if k not in ("data_files",)}
        if row["kind"] in ("group", "tag"):
            runs = catalog.leaves(row["name"], index)
            out["runs"] = {"count": len(runs), "tasks": runs[:20]}
            missing = catalog.missing_data([row["name"]], index, settings.hf_datasets_cache)
            out["data"] = {"state": "missing" if missing else "ready",
                           "missing": [m["task"] for m in missing][:20],
                           "missing_count": len(missing)}
        else:
            out["data"] = catalog.task_data(row, settings.hf_datasets_cache)
        if out["data"]["state"] == "missing":
            asked = [row["name"]]
            out["data"]["how"] = {"fetch_command": catalog.fetch_command(asked),
                                  "downloads_allowed": allowed}
        tasks.append(out)
    return {"status": "success", "data": {"status": "ready", "total": total,
                                          "tasks": tasks, **base}}


@bp.post("/api/datasets/<name>/fetch")
@documented("fetch a dataset's official data from the Hugging Face hub into this machine's "
            "cache (LBS_ALLOW_DATA_DOWNLOAD=1); body {subsets?: [...]}; progress in GET "
            "/api/datasets", body=FetchRequest, body_required=False,
            data={"dataset": {"type": "string"}, "fetch": {"type": "object"}}, status=202,
            errors=(403, 404, 422))
def fetch_dataset(name: str):
    settings = current_app.extensions["lbs"].settings
    try:
        ds = get_dataset(name)
    except UnknownDataset as exc:
        raise ApiError(404, "unknown_dataset", str(exc),
                       [{"field": "name", "message": str(exc)}]) from None
    if ds.hub is None:
        raise ApiError(422, "no_hub_source", f"{name} has no hub source to fetch from",
                       [{"field": "name", "message": "no hub source"}])
    if not settings.allow_data_download or settings.hub_offline:
        why = ("HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" if settings.hub_offline
               else "data downloads are off (LBS_ALLOW_DATA_DOWNLOAD=0)")
        raise ApiError(403, "downloads_disabled",
                       f"{why}; fetch it on a machine with a network: "
                       f"{fetch_command(name)}",
                       [{"field": "name", "message": why}])
    body = request.get_json(silent=True) or {}
    try:
        parts = FetchRequest.model_validate(body).subsets if isinstance(body, dict) else None
        known = parts is None or all(p in (ds.hub.configs or ()) for p in parts)
    except ValidationError:  # not a list of names
        known = False
    if not known:
        raise ApiError(422, "invalid_body", "subsets: a list of the dataset's parts",
                       [{"field": "subsets", "message": "a list of known parts"}])
    state = _fetches().start(name, parts, settings)
    return {"status": "success", "data": {"dataset": name, "fetch": state}}, 202


@bp.get("/api/models")
@documented("local models a job can name: the built-in ones and the checkpoint folders "
            "under LBS_MODEL_DIRS (name, kind, max_length; random_weights for a model "
            "whose weights are random)",
            data={"models": [{"type": "object", "properties": {
                "name": {"type": "string"}, "kind": {"type": "string"},
                "max_length": {"type": ["integer", "null"]},
                "random_weights": {"type": "boolean"},
                "architecture": {"type": ["string", "null"]}}}],
                  "model_dirs": [{"type": "string"}]})
def list_models():
    dirs = current_app.extensions["lbs"].settings.model_dirs
    return {"status": "success", "data": {"models": list_local_models(dirs),
                                          "model_dirs": list(dirs)}}
