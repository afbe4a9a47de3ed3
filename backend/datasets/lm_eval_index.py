"""lm-eval's task index, kept on disk between processes.

`TaskManager()` reads every task YAML lm-eval ships (about 15,000 names) before it can
load one task: ~15 s per process, paid by every worker that runs an lm-eval job and by
the server's task list. The index it builds is plain data (each entry: a name, a kind,
its YAML path, the parsed YAML with functions left as text, its tags), so it is written
once as JSON and read back in under a second by later processes.

A stored index is used only while it is the index lm-eval would build: its file name is
a digest of lm-eval's version, the folders indexed and the name, size and modification
time of every file under them (a YAML edited, added or removed makes a new index).

Imports lm_eval (which imports torch) only inside `task_manager`: worker and
subprocess paths only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped when the stored layout changes; part of the digest."""

_SKIP_DIRS = {"__pycache__", ".git", ".ipynb_checkpoints"}


def _lm_eval_tasks_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lm_eval.tasks")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lm_eval is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def index_roots(include: tuple[str, ...], defaults: bool) -> list[Path]:
    """The folders TaskManager scans, in its order: lm-eval's own tasks first."""
    roots = [_lm_eval_tasks_dir()] if defaults else []
    return roots + [Path(p) for p in include]


def digest(root: Path) -> str:
    """Identity of the index of one folder: lm-eval's version and every file's path,
    size and modification time (YAMLs include files with other names)."""
    h = hashlib.sha256(f"{FORMAT}\0{package_version('lm_eval')}\0{root.resolve()}".encode())
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            h.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def digests(include: tuple[str, ...], defaults: bool) -> tuple[str, ...]:
    return tuple(digest(root) for root in index_roots(include, defaults))


def _entries(index: dict[str, Any]) -> list[list[Any]]:
    return [[e.name, e.kind.name, None if e.yaml_path is None else str(e.yaml_path),
             e.cfg, sorted(e.tags)] for e in index.values()]


def _index_from(entries: list[list[Any]]) -> dict[str, Any]:
    from lm_eval.tasks._index import Entry, Kind

    return {name: Entry(name=name, kind=Kind[kind],
                        yaml_path=None if path is None else Path(path),
                        cfg=cfg, tags=set(tags))
            for name, kind, path, cfg, tags in entries}


def _manager_from(index: dict[str, Any], include: tuple[str, ...]) -> Any:
    """A TaskManager whose index is `index`: built empty (no folder scanned), then given
    the index and the name lists TaskManager derives from it."""
    from collections import defaultdict
    from itertools import chain

    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    manager = TaskManager(include_path=None, include_defaults=False)
    for attr in ("_index", "_all_tasks", "_all_subtasks", "_all_groups", "_all_tags"):
        if not hasattr(manager, attr):  # a TaskManager this code does not know
            raise AttributeError(f"TaskManager has no {attr}")
    buckets: dict[Any, list[str]] = defaultdict(list)
    for name, entry in index.items():
        buckets[entry.kind].append(name)
    manager.include_path = list(include) or None
    manager._index = index
    manager._all_tasks = sorted(index)
    manager._all_subtasks = sorted(chain.from_iterable(
        buckets[k] for k in (Kind.TASK, Kind.PY_TASK)))
    manager._all_groups = sorted(buckets[Kind.GROUP])
    manager._all_tags = sorted(buckets[Kind.TAG])
    return manager


KEEP = 16
"""Indexes kept in the cache folder (the newest); older ones are removed."""


def _store(file: Path, entries: list[list[Any]]) -> None:
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".index-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(entries, out)
        os.replace(tmp, file)  # atomic: a reader sees the old file or the whole new one
        tmp = None
        stored = sorted(file.parent.glob("lm_eval-index-*.json"),
                        key=lambda f: f.stat().st_mtime_ns, reverse=True)
        for old in stored[KEEP:]:
            old.unlink(missing_ok=True)
    except (OSError, TypeError, ValueError) as exc:
        log.warning("[Datasets] could not store the lm-eval task index in %s: %s",
                    file.parent, exc)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def root_index(root: Path, cache_dir: Path) -> dict[str, Any]:
    """The index of one folder as lm-eval's `TaskIndex.build` makes it, read from the
    cache when the same files were indexed before."""
    from lm_eval.tasks._index import TaskIndex

    file = Path(cache_dir) / f"lm_eval-index-{digest(root)}.json"
    if file.is_file():
        try:
            return _index_from(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("[Datasets] stored lm-eval task index %s unusable (%s); rebuilding",
                        file, exc)
    started = time.perf_counter()
    index = TaskIndex.build([root])
    log.info("[Datasets] lm-eval tasks of %s indexed in %.1f s (%d names)", root,
             time.perf_counter() - started, len(index))
    _store(file, _entries(index))
    return index


def task_manager(include: tuple[str, ...], defaults: bool, cache_dir: Path | None) -> Any:
    """lm-eval's TaskManager for these folders (and its own tasks when `defaults`),
    each folder's index read from `cache_dir` when the same files were indexed before,
    else built and stored; merged as TaskManager merges them (a later folder's name
    overrides an earlier one's). Without a cache folder (None) it is built every time."""
    from lm_eval.tasks import TaskManager

    if cache_dir is None:
        return TaskManager(include_path=list(include) or None, include_defaults=defaults)
    started = time.perf_counter()
    merged: dict[str, Any] = {}
    for root in index_roots(include, defaults):
        for name, entry in root_index(root, cache_dir).items():
            if name in merged:
                log.warning("[Datasets] lm-eval task %s from %s overrides the one from %s",
                            name, entry.yaml_path, merged[name].yaml_path)
            merged[name] = entry
    manager = _manager_from(merged, include)
    log.info("[Datasets] lm-eval task index ready in %.1f s (%d names)",
             time.perf_counter() - started, len(manager.all_tasks))
    return manager
