"""What the server and the worker ask lm-eval about its tasks, without the server
importing lm_eval (it imports torch): the task list (`cached_task_list`, `list_tasks`)
and the lengths of a job's requests (`request_shapes`, `build_shapes`), each found once
in a subprocess of this module; and lm-eval's TaskManager, once per process and index
(`shared_task_manager`), which the worker's `LmEvalTasks` loads its tasks with.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from backend.common.config import environment_with
from backend.datasets.lm_eval_results import jsonable

log = logging.getLogger(__name__)


_managers: dict[tuple, Any] = {}


def shared_task_manager(paths: tuple[str, ...], defaults: bool, cache_dir: Path | None) -> Any:
    """lm-eval's TaskManager (its task index) for these folders, once per worker process
    and index (`lm_eval_index`: read from the cache folder, or built in ~15 s and stored
    there). Tasks are loaded fresh per job; a file added or changed in the folders makes
    a new index."""
    from backend.datasets.lm_eval_index import digests, task_manager

    key = (paths, defaults, digests(paths, defaults))
    if key not in _managers:
        manager = task_manager(paths, defaults, cache_dir)
        manager._factory = _paths_factory()(meta=manager.metadata)
        _managers[key] = manager
    return _managers[key]


def _paths_factory() -> type:
    """lm-eval's TaskFactory whose task configs take relative local paths from the
    folder of their YAML (lm_eval_catalog.resolve_local_paths) instead of the process's
    working directory."""
    from lm_eval.tasks._factory import TaskFactory

    from backend.datasets.lm_eval_catalog import resolve_local_paths

    class PathsFromYaml(TaskFactory):
        def _load_full_config(self, entry: Any, overrides: Any = None) -> dict[str, Any]:
            cfg = super()._load_full_config(entry, overrides)
            return resolve_local_paths(cfg, entry.yaml_path)

    return PathsFromYaml

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1"}
"""What makes `datasets` read its cache only (datasets.config.HF_HUB_OFFLINE)."""


@contextmanager
def datasets_offline(offline: bool) -> Iterator[None]:
    """While inside, with `offline`, `datasets` (as lm-eval loads a task's data in this
    process) reads its cache only and asks the hub nothing: LBS_ALLOW_DATA_DOWNLOAD=0."""
    if not offline:
        yield
        return
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before

# --- the task list (GET /api/datasets, submit-time checks) ----------------------------

_cache: dict[tuple[str, ...], list[dict[str, Any]]] = {}
_pending: set[tuple[str, ...]] = set()
_lock = threading.Lock()


def cached_task_list(include: tuple[str, ...], cache_dir: Path | None
                     ) -> list[dict[str, Any]] | None:
    """The task list for these include folders, or None while it is being indexed
    (started here, off the request path, in a subprocess: lm_eval imports torch);
    `cache_dir` (LBS_CACHE_DIR) keeps lm-eval's task index."""
    key = tuple(include)
    with _lock:
        if key in _cache:
            return _cache[key]
        if key in _pending:
            return None
        _pending.add(key)
    threading.Thread(target=_index, args=(key, cache_dir), daemon=True,
                     name="lm-eval-index").start()
    return None


def _cache_arg(cache_dir: Path | None) -> list[str]:
    """The probe's first arguments: which process asked (it ends with that process, see
    lm_eval_probe) and the index cache."""
    import os

    return ["--parent", str(os.getpid()),
            "--cache", "off" if cache_dir is None else str(cache_dir)]


def _index(key: tuple[str, ...], cache_dir: Path | None) -> None:
    try:
        out = subprocess.run([sys.executable, "-m", "backend.datasets.lm_eval_probe",
                              *_cache_arg(cache_dir), *key],
                             capture_output=True, text=True, timeout=600, check=True)
        tasks = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - the list stays unknown; jobs still run
        log.warning("[Datasets] indexing lm-eval tasks failed: %s", exc)
        tasks = None
    with _lock:
        _pending.discard(key)
        if tasks is not None:
            _cache[key] = tasks


def list_tasks(include: list[str], cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every task, group and tag lm-eval knows (its own and those under `include`), with
    what the catalogue needs (lm_eval_catalog): tags, a group's members, and where the
    data is read from (local paths taken from the YAML's folder)."""
    from backend.datasets.lm_eval_catalog import _flat, resolve_local_paths

    manager = shared_task_manager(tuple(include), True, cache_dir)
    rows = []
    for name in manager.all_tasks:
        entry = manager.task_index[name]
        cfg = entry.cfg if isinstance(getattr(entry, "cfg", None), dict) else {}
        cfg = resolve_local_paths(json.loads(json.dumps(cfg, default=str)), entry.yaml_path)
        row = {"name": name, "kind": getattr(entry.kind, "name", str(entry.kind)).lower(),
               "yaml": str(entry.yaml_path or "")}
        version = (cfg.get("metadata") or {}).get("version") if isinstance(
            cfg.get("metadata"), dict) else None
        if version is not None:
            row["version"] = version
        for key in ("output_type", "dataset_path", "dataset_name", "num_fewshot"):
            if isinstance(cfg.get(key), str | int | float):
                row[key] = cfg[key]
        tags = sorted(getattr(entry, "tags", None) or [])
        if tags:
            row["tags"] = tags
        kwargs = cfg.get("dataset_kwargs")
        if isinstance(kwargs, dict) and kwargs.get("data_files"):
            row["data_files"] = _flat(kwargs["data_files"])
        if isinstance(cfg.get("task"), list):  # a group: its tasks
            row["tasks"] = [t if isinstance(t, str) else str(t.get("task", t))
                            if isinstance(t, dict) else str(t) for t in cfg["task"]]
        rows.append(jsonable(row))
    return rows


# --- the lengths of a job's requests (admission, at submit time) ---------------------

SPECIAL_TOKENS = 4
"""Tokens a tokenizer may add to plain text (BOS, EOS) and the leading-space marker of
SentencePiece: a text of n UTF-8 bytes is at most n + SPECIAL_TOKENS tokens (see
datasets.base.token_bound; lm-eval's requests are plain text, no chat template)."""


def plain_token_bound(nbytes: int) -> int:
    return nbytes + SPECIAL_TOKENS


_shapes: dict[str, dict[str, Any] | None] = {}


def request_shapes(include: tuple[str, ...], params: BaseModel,
                   cache_dir: Path | None, offline: bool = False) -> dict[str, Any] | None:
    """The longest requests of each kind lm-eval builds for the job's tasks (UTF-8
    bytes; see `build_shapes`), found once per set of parameters in a subprocess; None
    when they cannot be built here. `offline` (data downloads off): the subprocess
    reads the `datasets` cache only."""
    asked = params.model_dump(include={"tasks", "num_fewshot", "limit", "gen_kwargs",
                                       "fewshot_seed"})
    key = json.dumps([list(include), asked], sort_keys=True)
    with _lock:
        if key in _shapes:
            return _shapes[key]
    try:
        out = subprocess.run([sys.executable, "-m", "backend.datasets.lm_eval_probe",
                              *_cache_arg(cache_dir), "--shapes",
                              json.dumps(asked), *include],
                             capture_output=True, text=True, timeout=600, check=True,
                             env=environment_with(OFFLINE_ENV) if offline else None)
        shapes = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - then the estimate takes the whole context
        log.warning("[Datasets] the lengths of the lm-eval requests are unknown: %s", exc)
        shapes = None
    with _lock:
        _shapes[key] = shapes
    return shapes
