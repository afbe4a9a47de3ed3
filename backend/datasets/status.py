"""Whether each dataset's data is ready, where, how many items per part, and how to get
what is missing (GET /api/datasets, `lbs data status`).

Cheap per call: it looks at folders and the Hugging Face cache's refs (no network, no
file parsing). Items are counted once per file (path, size, mtime) in a background
thread, so a large file (LongBench v2's data.json is ~0.5 GB) never holds up a
request: until its count is known the part shows `items: null`.
"""

from __future__ import annotations

import csv
import json
import logging
import threading
from pathlib import Path
from typing import Any

from backend.datasets.hub import HubSource, guidance

log = logging.getLogger(__name__)


def count_items(path: Path) -> int:
    """Records in one data file (JSON list, JSONL, CSV, Parquet)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if suffix == ".jsonl":
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            return sum(1 for _ in csv.DictReader(fh))
    data = json.loads(path.read_text(encoding="utf-8"))
    return len(data["data"] if isinstance(data, dict) and "data" in data else data)


class ItemCounter:
    """Counts of files, computed once per (path, size, mtime) in one background thread."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int, int], int | None] = {}
        self.pending: list[Path] = []
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return (str(path), st.st_size, st.st_mtime_ns)

    def get(self, paths: list[Path], wait: bool = False) -> int | None:
        """The total count of `paths`, or None while some are still being counted
        (`wait`: count them now, in this thread)."""
        total = 0
        missing = []
        for path in paths:
            try:
                key = self._key(path)
            except OSError:
                return None
            with self.lock:
                known = key in self.counts
                value = self.counts.get(key)
            if wait and not known:
                value = self._count(path, key)
                known = True
            if not known:
                missing.append(path)
            elif value is None:
                return None
            else:
                total += value
        if missing:
            self._schedule(missing)
            return None
        return total

    def _count(self, path: Path, key: tuple[str, int, int]) -> int | None:
        try:
            value: int | None = count_items(path)
        except Exception as exc:  # noqa: BLE001 - an unreadable file counts as unknown
            log.warning("[Datasets] cannot count the items of %s: %s", path, exc)
            value = None
        with self.lock:
            self.counts[key] = value
        return value

    def _schedule(self, paths: list[Path]) -> None:
        with self.lock:
            self.pending.extend(p for p in paths if p not in self.pending)
            if self.thread is not None and self.thread.is_alive():
                return
            self.thread = threading.Thread(target=self._run, name="item-counter", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            with self.lock:
                if not self.pending:
                    return
                path = self.pending.pop(0)
            try:
                key = self._key(path)
            except OSError:
                continue
            with self.lock:
                if key in self.counts:
                    continue
            self._count(path, key)


COUNTER = ItemCounter()


def cache_hint(source: HubSource) -> Path | None:
    """The layout folder of a source's snapshot in the local hub cache, without network
    and without checking that every file is there (a partial fetch shows what it has)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=source.repo_id,
                                                            repo_type="dataset")
    ref = repo / "refs" / source.revision
    commit = ref.read_text().strip() if ref.is_file() else source.revision
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    if source.archive:
        extracted = repo / "extracted" / commit
        if not (extracted / ".complete").is_file():
            return snapshot if (snapshot / source.archive).is_file() else None
        snapshot = extracted
    return snapshot / source.layout if source.layout else snapshot


def dataset_status(ds: Any, allow_download: bool, offline: bool = False,
                   wait: bool = False) -> dict[str, Any]:
    """{"state": "ready"|"missing", "source", "where", "parts": [{"part", "split",
    "items", "default"}], "items", "items_by_split", "how": guidance}. `items` counts
    what a job with default parameters evaluates (the parts marked `default`: C-Eval's
    val split, not the dev questions used as shots); `items_by_split` every split's
    items. `wait` counts items now instead of in the background (the CLI)."""
    can_fetch = allow_download and not offline and ds.hub is not None
    how = guidance(ds, allow_download=can_fetch)
    if ds.data_per_task:
        return {"state": "per_task", "source": None, "where": None, "parts": [],
                "items": None, "how": how,
                "reason": "each task reads its own data: the task search (GET "
                          "/api/lm_eval/tasks, `data status lm_eval --tasks ...`) says "
                          "which are here, and a job whose data is missing is refused"}
    if ds.hub is None and not ds.has_data_parts:
        return {"state": "ready", "source": "bundled", "where": None, "parts": [],
                "items": None, "items_by_split": None, "how": how}
    local = ds.datasets_dir / ds.name if ds.datasets_dir is not None else None
    folder, source = None, None
    if local is not None and local.is_dir():
        folder, source = local, "folder"
    elif ds.hub is not None:
        try:
            folder, source = cache_hint(ds.hub), "hub cache"
        except Exception as exc:  # noqa: BLE001 - an unreadable cache is "not there"
            log.warning("[Datasets] cannot read the hub cache for %s: %s", ds.name, exc)
    if folder is None:
        return {"state": "missing", "source": None, "where": None, "parts": [],
                "items": 0, "items_by_split": {}, "how": how,
                "reason": f"no folder {local} and not in the Hugging Face cache"
                if ds.hub is not None else f"no folder {local}"}
    parts = []
    if ds.has_data_parts and folder.is_dir():
        for part, split, files in ds.data_parts(folder):
            parts.append({"part": part, "split": split,
                          "items": COUNTER.get(files, wait=wait),
                          "default": ds.runs_by_default(part, split)})
    elif ds.hub is not None and ds.hub.archive:
        parts = []  # not extracted yet: the first job (or `data fetch`) unpacks it
    counting = any(p["items"] is None for p in parts)
    by_split: dict[str, int] = {}
    for p in parts:
        by_split[p["split"]] = by_split.get(p["split"], 0) + (p["items"] or 0)
    out = {"state": "ready", "source": source, "where": str(folder), "parts": parts,
           "items": None if counting else sum(p["items"] for p in parts if p["default"]),
           "items_by_split": None if counting else by_split, "how": how}
    if ds.has_data_parts and not parts and not (ds.hub and ds.hub.archive
                                                        and folder.name != ds.hub.layout):
        out.update(state="missing", reason=f"{folder} holds none of the dataset's files "
                                            "in its official layout")
    return out
