"""Write files made from the code, or (`check`) say which differ: shared by
scripts/docs.py and scripts/requirements.py."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(root: Path, made: dict[str, str], check: bool, source: str,
                   command: str) -> int:
    """Write each file (a path under `root`) whose text differs from `made`; with `check`,
    write nothing and return 1 naming the files that differ from `source` (and the
    command that fixes it)."""
    stale = []
    for name, text in made.items():
        path = root / name
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        if check:
            stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {name}")
    if stale:
        print(f"{', '.join(stale)} differ from {source}: run {command}", file=sys.stderr)
        return 1
    return 0
