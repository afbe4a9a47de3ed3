"""The layers of backend/ import only downward (README, "Architecture"):

    common   settings, paths, logging, redaction, the secrets box: nothing else of ours
    queue    jobs and their storage, scheduling, notifications, commands, results
    engine   the evaluation loop and memory (backend/engine) and its plugins, runners
             (backend/runners) and datasets (backend/datasets)
    apps     the HTTP server (backend/server.py and backend/apps/api), the worker
             process, the CLI, the MCP server: they wire the queue to the engine

The queue and the engine do not know each other, and the queue and the HTTP server
never import torch or transformers.

Inside the engine, runners and datasets meet only through backend/engine/contracts.py:

    contracts  the shared vocabulary: nothing else of ours but common
    runners    common, contracts, runners
    datasets   common, contracts, datasets
    engine     the rest of backend/engine: all of the above

No two modules of backend/ import each other, directly or round a circle (imports
inside functions count: they are the same dependency, paid later)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "backend"

LAYER_OF = {"common": "common", "queue": "queue", "engine": "engine", "runners": "engine",
            "datasets": "engine", "apps": "apps", "server": "apps"}
MAY_IMPORT = {"common": {"common"}, "queue": {"common", "queue"},
              "engine": {"common", "engine"}, "apps": {"common", "queue", "engine", "apps"}}


SUB_LAYER = {"runners": "runners", "datasets": "datasets", "engine": "engine"}
SUB_MAY_IMPORT = {"contracts": {"contracts"}, "runners": {"contracts", "runners"},
                  "datasets": {"contracts", "datasets"},
                  "engine": {"contracts", "runners", "datasets", "engine"}}


def _sub_layer(module: str) -> str | None:
    """Where a module of the engine layer sits inside it (None: not in the engine)."""
    if module == "backend.engine.contracts":
        return "contracts"
    parts = module.split(".")
    return SUB_LAYER.get(parts[1]) if parts[0] == "backend" and len(parts) > 1 else None


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "backend" or len(parts) < 2:
        return None
    return LAYER_OF.get(parts[1])


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {_module_of(p) for p in BACKEND.rglob("*.py")}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`, at the top or inside a function;
    `from package import module` names the module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}")
                      if f"{node.module}.{alias.name}" in MODULES else (node.lineno, node.module)
                      for alias in node.names]
    return found


def _arrows(planted: dict[str, list[str]] | None = None) -> dict[str, list[tuple[int, str]]]:
    """Each module of backend/ and what it imports of backend/, plus `planted` arrows
    (module -> modules) for the tests that prove a rule catches them."""
    graph = {}
    for path in sorted(BACKEND.rglob("*.py")):
        graph[_module_of(path)] = [(line, name) for line, name in _imports(path)
                                   if name.startswith("backend.")]
    for module, names in (planted or {}).items():
        graph[module] = graph[module] + [(0, name) for name in names]
    return graph


def _upward(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    wrong = []
    for module, imports in graph.items():
        own = _layer(module)
        if own is None:
            continue
        for line, name in imports:
            target = _layer(name)
            if target is not None and target not in MAY_IMPORT[own]:
                wrong.append(f"{module}:{line} ({own}) imports {name} ({target})")
            inside, to = _sub_layer(module), _sub_layer(name)
            if inside and to and to not in SUB_MAY_IMPORT[inside]:
                wrong.append(f"{module}:{line} ({inside}) imports {name} ({to})")
    return wrong


def _circles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """The import circles: groups of modules each reachable from the others (Tarjan's
    strongly connected components), larger than one module. A package counts as
    importing what its __init__ does; importing a module implies its packages."""
    edges = {m: sorted({n for _, n in imports if n in graph and n != m})
             for m, imports in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_belongs_to_a_layer():
    stray = [p.relative_to(ROOT).as_posix() for p in BACKEND.glob("*.py")
             if p.stem not in ("__init__", "server")]
    folders = {p.name for p in BACKEND.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert stray == [], "a module beside server.py belongs in a layer's folder"
    assert folders <= set(LAYER_OF), f"folders without a layer: {folders - set(LAYER_OF)}"


def test_no_module_imports_upward():
    assert _upward(_arrows()) == []


@pytest.mark.parametrize("module, planted", [
    # the arrows the engine had before its contracts module: each must be caught
    ("backend.runners.base", "backend.engine.memory.manager"),
    ("backend.runners.hf.runner", "backend.engine.evaluation"),
    ("backend.runners.models", "backend.datasets.base"),
    ("backend.runners.openai.runner", "backend.datasets.base"),
    ("backend.datasets.lm_eval_tasks", "backend.engine.evaluation"),
    ("backend.datasets.base", "backend.runners.base"),
    ("backend.engine.memory.manager", "backend.queue.db"),
    ("backend.engine.contracts", "backend.datasets.base"),
    ("backend.engine.contracts", "backend.runners.base"),
    ("backend.queue.jobs", "backend.engine.evaluation"),
])
def test_a_planted_arrow_is_caught(module, planted):
    assert module in MODULES and planted in MODULES
    wrong = set(_upward(_arrows({module: [planted]}))) - set(_upward(_arrows()))
    assert len(wrong) == 1 and next(iter(wrong)).startswith(f"{module}:0 "), wrong


def test_no_import_circles():
    assert _circles(_arrows()) == []


@pytest.mark.parametrize("module, planted", [
    ("backend.datasets.files", "backend.datasets.base"),   # base reads files lazily
    ("backend.runners.registry", "backend.runners.models"),  # models asks the registry
])
def test_a_planted_circle_is_caught(module, planted):
    circles = _circles(_arrows({module: [planted]}))
    assert any(module in group and planted in group for group in circles), circles


def test_queue_and_server_stay_free_of_torch():
    """Importing the whole queue layer, the HTTP server and the cluster controller loads
    neither torch nor transformers (the server process never does torch work), nor ray
    (imported only when a Ray pool is used)."""
    queue = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                   for p in (BACKEND / "queue").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n"
            + "".join(f"import {m}\n" for m in [*queue, "backend.server",
                                                 "backend.apps.cluster.cli",
                                                 "backend.apps.cluster.ray_pool"])
            + "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'ray') "
              "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
