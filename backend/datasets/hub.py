"""Where a dataset's official data lives on the Hugging Face hub, and getting it.

A plugin declares `hub = HubSource(...)`: the dataset repository, its revision,
the files of the whole dataset (`files`, fnmatch patterns as huggingface_hub's
`allow_patterns`) and, when parts (subjects, subsets) can be fetched alone, the
files of one part (`part_files`, with `{part}`). `archive` names a zip in the
repository that holds the official layout (LongBench's `data.zip`: `datasets`
5 no longer runs the repository's loading script, so the zip is read directly).

Everything goes through huggingface_hub and its cache (`HF_HOME` / `HF_HUB_CACHE`):
`HF_ENDPOINT` and `HF_HUB_OFFLINE` are honoured by the library itself,
`HF_DATASETS_OFFLINE` through `Settings.hub_offline`. A fetched repository is a
snapshot folder in that cache, in the repository's own layout, which the plugins
read with `files.py`; an archive is extracted once next to the snapshot
(`<cache>/datasets--org--name/extracted/<commit>/`).

Order of precedence for a job's data (`locate`): the job's `data_dir`, then
`LBS_DATASETS_DIR/<name>/` when that folder exists, then the hub cache, then -
where data downloads are allowed (`LBS_ALLOW_DATA_DOWNLOAD`) - a fetch; otherwise
`DataMissing`, whose message says how to get the data.

This module imports huggingface_hub only inside functions, so the server (which
asks for the status of every dataset) never pays for it unless it looks.
"""

from __future__ import annotations

import logging
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.common.commands import lbs_command
from backend.engine.contracts import ParamError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int | None], None]
"""Called with (bytes done, bytes total or None) while a fetch runs."""


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    files: tuple[str, ...]
    """allow_patterns for the whole dataset."""
    revision: str = "main"
    part_files: tuple[str, ...] = ()
    """allow_patterns for one part, with `{part}` (empty: parts are not fetched alone)."""
    archive: str | None = None
    """A zip file in the repository holding the official layout."""
    layout: str = ""
    """Folder inside the snapshot (or the extracted archive) that holds the layout."""
    configs: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()

    def patterns(self, parts: list[str] | None = None) -> list[str]:
        if parts and self.part_files:
            return [p.format(part=part) for part in parts for p in self.part_files]
        return list(self.files)

    def public(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision,
                "url": f"https://huggingface.co/datasets/{self.repo_id}",
                "configs": list(self.configs), "splits": list(self.splits),
                "files": list(self.files), "archive": self.archive}


@dataclass
class DataAccess:
    """What a dataset may do to get its data in this process (part of its DataContext)."""

    allow_download: bool = False
    """LBS_ALLOW_DATA_DOWNLOAD: jobs may fetch missing data."""
    fetch_now: bool = False
    """This process fetches (a worker, the CLI); False in the server, which only checks."""
    offline: bool = False
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: read the cache only."""
    progress: ProgressFn | None = None
    fetched: list[dict[str, Any]] = field(default_factory=list)
    """What this access fetched: {"repo_id", "bytes", "files", "seconds"} per fetch."""


class DataMissing(ParamError):
    """The data is nowhere to be read; the message says how to get it."""

    def __init__(self, message: str, guidance: dict[str, Any], field: str = "data_dir"):
        super().__init__(field, message)
        self.guidance = guidance


class FetchPending(DataMissing):
    """Missing here, but downloads are allowed: the worker will fetch it (submit accepts)."""


def fetch_command(dataset: str, parts: list[str] | None = None) -> str:
    extra = f" --subsets {' '.join(parts)}" if parts else ""
    return lbs_command(f"data fetch {dataset}{extra}")


def guidance(ds: Any, parts: list[str] | None = None,
             allow_download: bool | None = None) -> dict[str, Any]:
    """How to get a dataset's data: the hub source, the command, the folder to copy into."""
    target = (ds.datasets_dir / ds.name) if ds.datasets_dir is not None else None
    out: dict[str, Any] = {"copy_to": str(target) if target else None}
    if ds.hub is not None:
        out["hub"] = ds.hub.public()
        out["fetch_command"] = fetch_command(ds.name, parts)
    if allow_download is not None:
        out["downloads_allowed"] = allow_download
    return out


def missing_message(ds: Any, parts: list[str] | None, allow_download: bool,
                    offline: bool = False) -> str:
    where = (f"LBS_DATASETS_DIR/{ds.name} ({ds.datasets_dir / ds.name})"
             if ds.datasets_dir is not None else f"LBS_DATASETS_DIR/{ds.name}")
    if ds.hub is None:
        return f"no data for {ds.name}: put its files in {where} or give data_dir"
    text = (f"no data for {ds.name} in {where} nor in the Hugging Face cache; its official "
            f"data is the hub dataset {ds.hub.repo_id}. On a machine with a network run "
            f"`{fetch_command(ds.name, parts)}`")
    text += f", or {copy_hint(ds.hub, 'that folder')}"
    if offline:
        text += " (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: nothing is downloaded)"
    elif not allow_download:
        text += " (or set LBS_ALLOW_DATA_DOWNLOAD=1 so that jobs fetch it themselves)"
    return text


def copy_hint(source: HubSource, folder: Any) -> str:
    """"copy the repository's files into <folder>": how to get the data by hand."""
    if source.archive:
        return f"copy the files of {source.archive} ({source.layout or '.'}/) into {folder}"
    return f"copy the repository's files into {folder}"


def fetch_failure(ds: Any, exc: BaseException) -> str:
    """Why `fetch` failed, in the user's words, and how to get the data without it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import DryRunError

    if isinstance(exc, DryRunError):  # the file list could not be read from the hub
        reason = (f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to list the "
                  f"files of {ds.hub.repo_id} (no network, a mirror in HF_ENDPOINT that does "
                  "not answer, or a token it needs in HF_TOKEN)")
    else:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    target = ds.datasets_dir / ds.name if ds.datasets_dir is not None else \
        f"LBS_DATASETS_DIR/{ds.name}"
    return (f"fetching {ds.hub.repo_id} failed: {reason}. Without a network, "
            f"{copy_hint(ds.hub, target)} (or copy a Hugging Face cache that holds it)")


# --- the Hugging Face cache ------------------------------------------------------------

def _snapshot(source: HubSource, parts: list[str] | None, local_only: bool,
              **kwargs: Any) -> Any:
    """huggingface_hub's snapshot_download of the source's files (its own progress bars
    silenced: ours count bytes); a Path, or the file list with dry_run."""
    from huggingface_hub import snapshot_download

    result = snapshot_download(source.repo_id, repo_type="dataset", revision=source.revision,
                               allow_patterns=source.patterns(parts),
                               local_files_only=local_only, tqdm_class=_Silent, **kwargs)
    return result if kwargs.get("dry_run") else Path(result)


def _layout_folder(source: HubSource, snapshot: Path, extract: bool) -> Path | None:
    """The folder holding the official layout inside a snapshot; an archive is
    extracted once (when `extract`) next to the snapshot."""
    if not source.archive:
        return snapshot / source.layout if source.layout else snapshot
    target = snapshot.parent.parent / "extracted" / snapshot.name
    done = target / ".complete"
    if not done.is_file():
        if not extract:
            return None
        _extract(snapshot / source.archive, target)
        done.write_text(source.archive, encoding="utf-8")
    return target / source.layout if source.layout else target


UNPACK_MAX_BYTES = 8 * 1024**3
"""Most bytes an archive may unpack to (LongBench's data.zip holds under 1 GiB)."""
UNPACK_MAX_RATIO = 100
"""Most bytes unpacked per byte of archive (text compresses 3-10 times; a zip bomb
thousands of times)."""
UNPACK_SLACK = 1024**2
"""Unpacked bytes always allowed on top of the ratio, for tiny archives."""


def _extract(archive: Path, target: Path, max_bytes: int = UNPACK_MAX_BYTES,
             max_ratio: int = UNPACK_MAX_RATIO) -> None:
    """Unzip into `target`, refusing members that would land outside it and archives
    that unpack to more than `max_bytes` or `max_ratio` times their own size. Members
    are streamed and their bytes counted as written (a member's declared size may lie);
    a refused archive leaves nothing behind."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    limit = min(max_bytes, max_ratio * archive.stat().st_size + UNPACK_SLACK)
    written = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in members:
                dest = (target / member.filename).resolve()
                if not dest.is_relative_to(root):
                    raise ParamError("data_dir", f"{archive.name}: member {member.filename!r} "
                                                 "points outside the folder; not extracted")
            for member in members:
                dest = (target / member.filename).resolve()
                if member.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as out:
                    while chunk := src.read(1024**2):
                        written += len(chunk)
                        if written > limit:
                            raise ParamError("data_dir", _too_big(archive, limit, max_bytes))
                        out.write(chunk)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    log.info("[Datasets] unpacked %s: %d bytes", archive.name, written)


def _too_big(archive: Path, limit: int, max_bytes: int) -> str:
    size = archive.stat().st_size
    why = (f"more than {max_bytes} bytes" if limit == max_bytes else
           f"more than {limit} bytes, over {limit // max(size, 1)} times its own "
           f"{size} bytes")
    log.warning("[Datasets] %s unpacks to %s; refused", archive.name, why)
    return (f"{archive.name} unpacks to {why}: refused as a damaged or hostile archive "
            "(nothing was kept); fetch it again from a source you trust")


def cached_folder(source: HubSource, parts: list[str] | None = None,
                  extract: bool = True) -> Path | None:
    """The data's folder from the local Hugging Face cache (no network), None when the
    cache does not hold every file asked for."""
    try:
        snapshot = _snapshot(source, parts, local_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not (completely) in the cache"
        return None
    folder = _layout_folder(source, snapshot, extract)
    return folder if folder is not None and folder.is_dir() else None


def _archive_cached(source: HubSource) -> bool:
    try:
        return (_snapshot(source, None, local_only=True) / source.archive).is_file()
    except Exception:  # noqa: BLE001 - not in the cache
        return False


class _Silent:
    """A tqdm that shows nothing: every method huggingface_hub calls on it does nothing."""

    n = 0
    total = 0

    def __init__(self, *args: Any, **kwargs: Any):
        return None

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class _Bar:
    """A tqdm stand-in for hf_hub_download: adds the bytes written to a shared count.

    Plain HTTP downloads call `update(len(chunk))`; Xet downloads call `update` with the
    bytes reconstructed on disk and, because this class has `update_transfer`, send the
    network bytes there (ignored, so nothing is counted twice). Any other tqdm method
    they call (`set_postfix_str`, `refresh`…) does nothing.
    """

    counter: _Counter

    def __init__(self, *args: Any, **kwargs: Any):
        self.n = kwargs.get("initial", 0) or 0
        self.total = kwargs.get("total")

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int | float | None = 1) -> None:
        self.n += int(n or 0)
        self.counter.add(int(n or 0))

    def update_transfer(self, n: int | float | None = 1) -> None:
        return None

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class _Counter:
    def __init__(self, total: int | None, progress: ProgressFn | None, every_s: float = 0.25):
        self.done = 0
        self.total = total
        self.progress = progress
        self.every_s = every_s
        self.last = 0.0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            due = now - self.last >= self.every_s
            if due:
                self.last = now
        if due:
            self.report()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)


def fetch(source: HubSource, parts: list[str] | None = None,
          progress: ProgressFn | None = None) -> tuple[Path, dict[str, Any]]:
    """Download what is not cached yet (bytes reported to `progress`), then return the
    layout folder and {"repo_id", "bytes", "files", "seconds"}. Raises what
    huggingface_hub raises (offline, not found, network errors)."""
    from huggingface_hub import hf_hub_download

    started = time.monotonic()
    plan = _snapshot(source, parts, local_only=False, dry_run=True)
    todo = [f for f in plan if f.will_download]
    total = sum(f.file_size or 0 for f in todo)
    counter = _Counter(total, progress)
    bar = type("Bar", (_Bar,), {"counter": counter})
    counter.report()
    for info in todo:
        hf_hub_download(source.repo_id, info.filename, repo_type="dataset",
                        revision=info.commit_hash, tqdm_class=bar)
    # The snapshot call records the revision's commit and the tree listing in the cache,
    # so that offline reads later know the snapshot is complete.
    snapshot = _snapshot(source, parts, local_only=False)
    counter.report()
    folder = _layout_folder(source, snapshot, extract=True)
    summary = {"repo_id": source.repo_id, "revision": source.revision,
               "bytes": counter.done, "files": len(todo),
               "seconds": round(time.monotonic() - started, 3)}
    log.info("[Datasets] fetched %s: %d files, %d bytes in %.1f s", source.repo_id,
             len(todo), counter.done, summary["seconds"])
    return folder, summary


def locate(ds: Any, parts: list[str] | None = None) -> Path:
    """The folder of a dataset's data when the job gives no data_dir and
    LBS_DATASETS_DIR/<name>/ does not exist: the hub cache, or a fetch when allowed
    and this process fetches. Raises DataMissing (FetchPending when the worker will
    fetch it)."""
    access: DataAccess = ds.data_access or DataAccess()
    parts = parts if ds.hub.part_files else None
    folder = cached_folder(ds.hub, parts, extract=access.fetch_now)
    if folder is not None:
        return folder
    if ds.hub.archive and not access.fetch_now and _archive_cached(ds.hub):
        # the zip is in the cache but not unpacked yet: the worker unpacks it (the
        # server does not spend a request on that)
        raise FetchPending(f"{ds.hub.archive} of {ds.hub.repo_id} is cached; the worker "
                           "unpacks it", guidance(ds, parts, access.allow_download))
    can_fetch = access.allow_download and not access.offline
    if can_fetch and access.fetch_now:
        try:
            folder, summary = fetch(ds.hub, parts, access.progress)
        except Exception as exc:  # noqa: BLE001 - network/hub errors become a job error
            raise DataMissing(fetch_failure(ds, exc), guidance(ds, parts, True)) from None
        access.fetched.append(summary)
        return folder
    message = missing_message(ds, parts, access.allow_download, access.offline)
    info = guidance(ds, parts, can_fetch)
    if can_fetch:
        raise FetchPending(message, info)
    raise DataMissing(message, info)
