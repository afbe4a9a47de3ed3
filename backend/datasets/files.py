"""Reading dataset files in the layouts their authors publish: JSON (a list, or an
object with a "data" list), JSONL, CSV and Parquet (as on the Hugging Face hub).

For jobs from the API every file is confined, not only its folder: a file inside an
allowed folder may be a symbolic link to anywhere. A dataset reads through its own
`Dataset.read_all` / `read_records`, which pass the folders its job may read
(`DataContext.read_roots`); `read_records` resolves each file and refuses one that
leads out (PathRefused, 403).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from backend.common.paths import OutsideAllowedFolders, confine_file
from backend.engine.contracts import ParamError, PathRefused

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")

_reads: ContextVar[list[Path] | None] = ContextVar("lbs_data_reads", default=None)


@contextmanager
def recording_reads() -> Iterator[list[Path]]:
    """Collect the data files read in this context (`read_records`, `note_read`): the
    data a job's items came from, for its run manifest."""
    token = _reads.set([])
    try:
        yield _reads.get()
    finally:
        _reads.reset(token)


def note_read(path: Path) -> None:
    """A dataset read `path` (read_records notes its own reads)."""
    reads = _reads.get()
    if reads is not None and path not in reads:
        reads.append(path)


def checked_file(path: Path, roots: Sequence[Path] | None,
                 field: str = "data_dir") -> Path:
    """`path` resolved, if reads are unconfined (`roots` None) or it stays under `roots`;
    PathRefused naming `field` otherwise."""
    if roots is None:
        return path
    try:
        return confine_file(path, roots)
    except OutsideAllowedFolders as exc:
        raise PathRefused(field, f"refused: {exc}") from None


def find_files(folder: Path, stems: list[str], field: str = "data_dir") -> list[Path]:
    """The files holding a split: `<stem><ext>` (any of EXTENSIONS), else every shard of a
    hub Parquet layout, `<stem>/*.parquet` or `<config>/<stem>-0000k-of-0000n.parquet` (the
    shards of the first config folder in name order, e.g. GSM8K's `main`). ParamError
    naming what was looked for when there is none."""
    for stem in stems:
        for ext in EXTENSIONS:
            if (folder / f"{stem}{ext}").is_file():
                return [folder / f"{stem}{ext}"]
    for stem in stems:
        shards = sorted(folder.glob(f"{stem}/*.parquet"))
        if not shards:
            found = sorted(folder.glob(f"**/{stem}-*.parquet"))
            shards = [p for p in found if found and p.parent == found[0].parent]
        if shards:
            return shards
    raise ParamError(field, f"none of {', '.join(s + '.jsonl/.json/.parquet/.csv' for s in stems)}"
                            f" in {folder}")


def read_all(paths: list[Path], roots: Sequence[Path] | None = None) -> list[dict[str, Any]]:
    """Every record of every file, in order (the shards of one split)."""
    return [record for path in paths for record in read_records(path, roots)]


def read_records(path: Path, roots: Sequence[Path] | None = None) -> list[dict[str, Any]]:
    """Every record of a JSON, JSONL, CSV or Parquet file, as dicts. With `roots`, the
    file must resolve under one of them (PathRefused otherwise): a dataset passes its
    job's (`Dataset.read_records`)."""
    suffix = path.suffix.lower()
    path = checked_file(path, roots)
    note_read(path)
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["data"] if isinstance(data, dict) and "data" in data else data
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        # ParquetFile reads the one file; read_table would import pyarrow.dataset (and
        # pandas) first, about a second on a cold start (bench/data_fetch.py)
        records = pq.ParquetFile(path).read().to_pylist()
        return [{k: (list(v) if hasattr(v, "tolist") else v) for k, v in r.items()}
                for r in records]
    raise ParamError("data_dir", f"cannot read {path.name}: expected one of {EXTENSIONS}")
