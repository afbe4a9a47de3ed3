"""Reading dataset files in the layouts their authors publish: JSON (a list, or an
object with a "data" list), JSONL, CSV and Parquet (as on the Hugging Face hub)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from backend.datasets.base import ParamError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


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


def find_file(folder: Path, stems: list[str], field: str = "data_dir") -> Path:
    """The first file of `find_files` (to say a split exists; read with `find_files`)."""
    return find_files(folder, stems, field)[0]


def read_all(paths: list[Path]) -> list[dict[str, Any]]:
    """Every record of every file, in order (the shards of one split)."""
    return [record for path in paths for record in read_records(path)]


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON, JSONL, CSV or Parquet file, as dicts."""
    suffix = path.suffix.lower()
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
