"""lm-eval's tasks as a catalogue: search by name, group or tag, and whether each
task's data can be read here (GET /api/lm_eval/tasks, the MCP tool `search_lm_eval_tasks`,
`data status lm_eval`, and the submit-time refusal of tasks whose data is missing).

Works on the task list rows of `lm_eval_lookup.list_tasks` (plain data, built in a
subprocess); imports neither lm_eval nor datasets, so the server stays free of torch.

Where a task's data lives:
- a local file task (`dataset_path: json|csv|parquet|text|arrow` with `data_files`), or a
  local folder as `dataset_path`: ready when the files exist. Relative paths are taken
  from the task YAML's folder when the file is there (`resolve_local_paths`), else from
  the working directory as lm-eval itself does;
- a hub dataset (`dataset_path: allenai/ai2_arc`, `dataset_name: ARC-Easy`): ready when
  the `datasets` cache holds that configuration, prepared by an earlier load (a bare hub
  snapshot is not enough: `datasets` needs the hub to read it, and offline it reads only
  its own cache). `data fetch lm_eval --tasks …` prepares it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder",
                  "audiofolder"}
"""`datasets` packaged builders whose data are the task's `data_files`."""


# --- local paths relative to the YAML ------------------------------------------------

def _flat(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for item in value for v in _flat(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flat(item)]
    return []


def _absolute(value: Any, folder: Path) -> Any:
    """`data_files` (a path, a list, or split -> path(s)) with each relative path that
    exists under `folder` made absolute; others left as written."""
    if isinstance(value, str):
        if "://" in value or os.path.isabs(value) or not (folder / value).exists():
            return value
        return str((folder / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, folder) for k, v in value.items()}
    return value


def resolve_local_paths(cfg: dict[str, Any], yaml_path: Any) -> dict[str, Any]:
    """A task config whose relative local paths (`dataset_kwargs.data_files`,
    `dataset_kwargs.data_dir`, a folder `dataset_path`) are taken from the folder of the
    YAML that wrote them, when they exist there. Returns the same dict, changed."""
    if not yaml_path or not isinstance(cfg, dict):
        return cfg
    folder = Path(yaml_path).parent
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        for key in ("data_files", "data_dir"):
            if key in kwargs:
                kwargs[key] = _absolute(kwargs[key], folder)
    path = cfg.get("dataset_path")
    if (isinstance(path, str) and path not in LOCAL_BUILDERS
            and (path.startswith(".") or (folder / path).is_dir())):
        cfg["dataset_path"] = _absolute(path, folder)
    return cfg


# --- where data is read from -----------------------------------------------------------

def hub_prepared(repo_id: str, config: str | None, cache: Path) -> Path | None:
    """The folder of a hub dataset configuration `datasets` prepared in its cache
    (`cache` is settings.hf_datasets_cache:
    `<cache>/<org>___<name>/<config>/<version>/<commit>/dataset_info.json`), or None."""
    root = cache / repo_id.replace("/", "___")
    if not root.is_dir():
        return None
    wanted = [config or "default"]
    folders = [d for d in root.iterdir() if d.is_dir() and d.name in wanted]
    if not folders and config:  # `datasets` may write the name in another case
        folders = [d for d in root.iterdir() if d.is_dir() and d.name.lower() == config.lower()]
    for folder in folders:
        for info in sorted(folder.glob("*/*/dataset_info.json")):
            return info.parent
    return None


def task_data(row: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Whether one task's data can be read here: {"state": "ready"|"missing"|"unknown",
    "source": "local"|"hub"|None, "hub"?, "config"?, "where"?, "missing"?}."""
    path = row.get("dataset_path")
    if not isinstance(path, str) or not path:
        return {"state": "unknown", "source": None}  # a Python task: it says in its code
    files = row.get("data_files") or []
    if path in LOCAL_BUILDERS:
        absent = [f for f in files if "://" not in f and not Path(f).exists()]
        if not files:
            return {"state": "unknown", "source": "local"}
        out = {"source": "local", "where": files[0] if len(files) == 1 else files}
        if absent:
            return {**out, "state": "missing", "missing": absent}
        return {**out, "state": "ready"}
    if Path(path).is_dir() or path.startswith((".", "/", "~")):
        return {"state": "ready" if Path(path).expanduser().is_dir() else "missing",
                "source": "local", "where": path}
    config = row.get("dataset_name") if isinstance(row.get("dataset_name"), str) else None
    out = {"source": "hub", "hub": path, "config": config}
    prepared = hub_prepared(path, config, cache)
    if prepared is not None:
        return {**out, "state": "ready", "where": str(prepared)}
    return {**out, "state": "missing"}


# --- names: tasks, groups, tags --------------------------------------------------------

def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}


def leaves(name: str, rows: dict[str, dict[str, Any]], seen: set[str] | None = None
           ) -> list[str]:
    """The tasks a name runs: itself for a task, its members for a group (recursively)
    or a tag (the tasks that carry it)."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    row = rows.get(name)
    if row is None:
        return []
    kind = row.get("kind")
    if kind == "group":
        return [leaf for member in row.get("tasks") or [] for leaf in leaves(member, rows, seen)]
    if kind == "tag":  # lm-eval lists a tag's members as the tag entry's `tags`
        members = set(row.get("tags") or []) | {
            r["name"] for r in rows.values()
            if r.get("kind") in ("task", "py_task") and name in (r.get("tags") or [])}
        return [leaf for member in sorted(members) for leaf in leaves(member, rows, seen)]
    return [name]


def missing_data(tasks: list[str], index: dict[str, dict[str, Any]], cache: Path
                 ) -> list[dict[str, Any]]:
    """The job's leaf tasks whose data is missing here: [{"task", "asked", **task_data}]."""
    out, done = [], set()
    for asked in tasks:
        for leaf in leaves(asked, index):
            if leaf in done:
                continue
            done.add(leaf)
            data = task_data(index[leaf], cache)
            if data["state"] == "missing":
                out.append({"task": leaf, "asked": asked, **data})
    return out


def fetch_command(tasks: list[str]) -> str:
    from backend.common.commands import lbs_command

    return lbs_command(f"data fetch lm_eval --tasks {' '.join(tasks)}")


def missing_message(missing: list[dict[str, Any]], allow_download: bool,
                    offline: bool, cache: Path) -> str:
    """What is missing and how to get it, in a user's words."""
    hub = [m for m in missing if m["source"] == "hub"]
    local = [m for m in missing if m["source"] == "local"]
    parts = []
    if hub:
        shown = ", ".join(f"{m['task']} ({m['hub']}" + (f", {m['config']})" if m["config"]
                                                        else ")") for m in hub[:8])
        more = f" and {len(hub) - 8} more" if len(hub) > 8 else ""
        asked = sorted({m["asked"] for m in hub})
        parts.append(
            f"the data of lm-eval task(s) {shown}{more} is not in this machine's Hugging "
            f"Face datasets cache ({cache}). On a machine with a network run "
            f"`{fetch_command(asked)}` (it loads each dataset once into the cache) and copy "
            "the cache folder here" + (
                " (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: nothing is downloaded)"
                if offline else "" if allow_download else
                ", or set LBS_ALLOW_DATA_DOWNLOAD=1 so that jobs download it themselves"))
    for m in local[:8]:
        files = ", ".join(m.get("missing") or [str(m.get("where"))])
        parts.append(f"lm-eval task {m['task']} reads {files}, which does not exist")
    return "; ".join(parts)


# --- search ----------------------------------------------------------------------------

def search(rows: list[dict[str, Any]], query: str = "", kind: str | None = None,
           tag: str | None = None, group: str | None = None, offset: int = 0,
           limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
    """Rows whose name (or dataset) contains every word of `query`, of this kind, with
    this tag, in this group; exact name matches first, then by name. (total, page)."""
    words = [w for w in query.lower().split() if w]
    members = None
    if group:  # the group's members at every level, and the tasks they run
        index = by_name(rows)
        members, todo = set(), [group]
        while todo:
            row = index.get(todo.pop())
            for name in (row or {}).get("tasks") or []:
                if name not in members:
                    members.add(name)
                    todo.append(name)
        members |= set(leaves(group, index))

    def hit(row: dict[str, Any]) -> bool:
        text = f"{row['name']} {row.get('dataset_path') or ''}".lower()
        return (all(w in text for w in words)
                and (kind is None or row.get("kind") == kind)
                and (tag is None or tag in (row.get("tags") or []))
                and (members is None or row["name"] in members))

    found = [r for r in rows if hit(r)]
    exact = "_".join(words)
    found.sort(key=lambda r: (r["name"].lower() != exact,
                              not r["name"].lower().startswith(words[0]) if words else False,
                              len(r["name"]), r["name"]))
    return len(found), found[offset:offset + limit]
