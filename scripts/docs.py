"""Regenerate the parts of docs/ made from the code: the settings table
(docs/settings.md, from backend/common/config.py) and the list of endpoints
(docs/api.md, from the app's /openapi.json). `--check` exits 1 when either differs
(tests/test_docs.py runs it).

Usage: python scripts/docs.py [--check]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- generated: {name} -->", "<!-- end generated: {name} -->"


def endpoints_table() -> str:
    """Every documented route: method, path, what it does (the OpenAPI summary)."""
    with tempfile.TemporaryDirectory() as data:
        os.environ["LBS_DATA_DIR"] = data
        os.environ["LBS_ENV_FILE"] = str(Path(data) / "no.env")
        from backend.apps.api.openapi import build_spec
        from backend.common.config import load_settings
        from backend.server import create_app

        spec = build_spec(create_app(load_settings()))
    rows = ["| method | path | what it does |", "| --- | --- | --- |"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            summary = " ".join(op.get("summary", "").split()).replace("|", "\\|")
            rows.append(f"| {method.upper()} | `{path}` | {summary} |")
    return "\n".join(rows) + "\n"


def settings_table() -> str:
    from backend.common.settings_table import markdown_table

    return markdown_table()


PARTS = {"docs/settings.md": ("settings", settings_table),
         "docs/api.md": ("endpoints", endpoints_table)}


def render(text: str, name: str, made: str) -> str:
    begin, end = BEGIN.format(name=name), END.format(name=name)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{made}{end}{tail}"


def main() -> int:
    from generated import write_or_check

    made = {file: render((ROOT / file).read_text(encoding="utf-8"), name, make())
            for file, (name, make) in PARTS.items()}
    return write_or_check(ROOT, made, "--check" in sys.argv[1:], "the code",
                          "python scripts/docs.py")


if __name__ == "__main__":
    sys.exit(main())
