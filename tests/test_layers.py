"""The layers of backend/ import only downward (README, "Architecture"):

    common   settings, paths, logging, redaction, the secrets box: nothing else of ours
    queue    jobs and their storage, scheduling, notifications, commands, results
    engine   the evaluation loop, admission, memory (backend/engine) and its plugins,
             runners (backend/runners) and datasets (backend/datasets)
    apps     the HTTP server (backend/server.py and backend/apps/api), the worker
             process, the CLI, the MCP server: they wire the queue to the engine

The queue and the engine do not know each other, and the queue and the HTTP server
never import torch or transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "backend"

LAYER_OF = {"common": "common", "queue": "queue", "engine": "engine", "runners": "engine",
            "datasets": "engine", "apps": "apps", "server": "apps"}
MAY_IMPORT = {"common": {"common"}, "queue": {"common", "queue"},
              "engine": {"common", "engine"}, "apps": {"common", "queue", "engine", "apps"}}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "backend" or len(parts) < 2:
        return None
    return LAYER_OF.get(parts[1])


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from backend import x` names a module of the package
            found += [(node.lineno, f"{node.module}.{alias.name}")
                      if node.module == "backend" else (node.lineno, node.module)
                      for alias in node.names]
    return found


def test_every_module_belongs_to_a_layer():
    stray = [p.relative_to(ROOT).as_posix() for p in BACKEND.glob("*.py")
             if p.stem not in ("__init__", "server")]
    folders = {p.name for p in BACKEND.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert stray == [], "a module beside server.py belongs in a layer's folder"
    assert folders <= set(LAYER_OF), f"folders without a layer: {folders - set(LAYER_OF)}"


def test_no_module_imports_upward():
    upward = []
    for path in sorted(BACKEND.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = _layer(module)
        if own is None:
            continue
        for line, name in _imports(path):
            target = _layer(name)
            if target is not None and target not in MAY_IMPORT[own]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {name} "
                              f"({target})")
    assert upward == []


def test_queue_and_server_stay_free_of_torch():
    """Importing the whole queue layer and the HTTP server loads neither torch nor
    transformers (the server process never does torch work)."""
    queue = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                   for p in (BACKEND / "queue").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n"
            + "".join(f"import {m}\n" for m in [*queue, "backend.server"])
            + "print(sorted(m for m in ('torch', 'transformers', 'accelerate') "
              "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
