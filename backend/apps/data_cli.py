"""`lbs data fetch|status`: get a dataset's official data, see what is ready.

    lbs data fetch ceval --subsets law logic
    lbs data status

`data fetch` downloads from the Hugging Face hub (HF_ENDPOINT, HF_TOKEN and the cache of
huggingface_hub apply) whatever LBS_ALLOW_DATA_DOWNLOAD says: it is the explicit way to
get data, on a machine with a network. With `--progress-file` it also writes its progress
as JSON for the server's Fetch button (see backend/apps/api/datasets.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from backend.common.commands import lbs_command


def add_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="fetch datasets' official data, or show what is ready",
                          description="Fetch a dataset's official data into the Hugging Face "
                                      "cache, or show which datasets' data is here.",
                          epilog="examples: lbs data status;  lbs data fetch ceval --subsets "
                                 "law;  lbs data fetch lm_eval --tasks arc_easy")
    dsub = data.add_subparsers(dest="data_command", required=True)
    fetch = dsub.add_parser("fetch", help="download a dataset's official data into the "
                                          "Hugging Face cache")
    fetch.add_argument("dataset")
    fetch.add_argument("--subsets", "--subjects", nargs="+", metavar="PART",
                       help="only these parts (C-Eval subjects); default: all")
    fetch.add_argument("--tasks", nargs="+", metavar="TASK",
                       help="lm_eval: the tasks, groups or tags whose datasets to load into "
                            "the Hugging Face datasets cache")
    fetch.add_argument("--progress-file", help=argparse.SUPPRESS)
    status = dsub.add_parser("status", help="which datasets' data is ready, where, how many "
                                            "items")
    status.add_argument("dataset", nargs="?")
    status.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="lm_eval: whether these tasks' data is here")
    status.add_argument("--json", action="store_true", help="print JSON")


def _write_progress(path: str | None, state: dict[str, Any]) -> None:
    if not path:
        return
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps({**state, "at": time.time()}), encoding="utf-8")
    os.replace(tmp, path)


def cmd_data(args: argparse.Namespace) -> int:
    from backend.common.config import load_settings
    from backend.common.logs import setup_logging
    from backend.datasets.base import DataContext
    from backend.datasets.registry import UnknownDataset, get_dataset
    from backend.engine.plugins import load_plugins

    settings = load_settings()
    setup_logging("WARNING")
    load_plugins(list(settings.plugin_dirs))
    if args.data_command == "status":
        return _status(args, settings)
    try:
        ds = get_dataset(args.dataset, DataContext.of(settings))
    except UnknownDataset as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ds.data_per_task:
        return _fetch_tasks(ds, args, settings)
    return _fetch(ds, args, settings)


def _task_rows(ds: Any, settings: Any) -> list[dict[str, Any]]:
    from backend.datasets.lm_eval_lookup import list_tasks

    return list_tasks(list(ds.include_path), settings.cache_dir)


def _fetch_tasks(ds: Any, args: argparse.Namespace, settings: Any) -> int:
    """Load each named lm-eval task once with downloads on, as a job would: `datasets`
    prepares the task's hub data in its cache, where offline jobs read it."""
    from backend.datasets import lm_eval_catalog as catalog

    if not args.tasks:
        print(f"error: name the tasks: data fetch {ds.name} --tasks arc_easy ...",
              file=sys.stderr)
        return 2
    if settings.hub_offline:
        print("error: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: nothing can be downloaded",
              file=sys.stderr)
        return 2
    print("indexing lm-eval's tasks…", file=sys.stderr)
    rows = _task_rows(ds, settings)
    index = catalog.by_name(rows)
    unknown = [t for t in args.tasks if t not in index]
    if unknown:
        print(f"error: unknown lm-eval task(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    cache = settings.hf_datasets_cache
    missing = catalog.missing_data(args.tasks, index, cache)
    local = [m for m in missing if m["source"] == "local"]
    if local:
        print("error: " + catalog.missing_message(local, True, False, cache), file=sys.stderr)
        return 1
    if not missing:
        print("every task's data is already here")
        return 0
    from backend.datasets.lm_eval_lookup import shared_task_manager

    manager = shared_task_manager(tuple(ds.include_path), True, settings.cache_dir)
    failed = 0
    for m in missing:
        print(f"fetching data: {m['task']} from the hub dataset {m['hub']}"
              + (f" ({m['config']})" if m["config"] else ""), file=sys.stderr)
        try:
            manager.load([m["task"]])  # lm-eval's own download of the task's data
        except Exception as exc:  # noqa: BLE001 - report any hub/network error plainly
            failed += 1
            print(f"error: fetching {m['hub']} for {m['task']} failed: "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  file=sys.stderr)
    left = catalog.missing_data(args.tasks, index, cache)
    for m in left:
        print(f"  still missing: {m['task']} ({m['hub']})", file=sys.stderr)
    print(f"{len(missing) - len(left)} of {len(missing)} task(s) fetched into "
          f"{cache}")
    return 1 if failed or left else 0


def _fetch(ds: Any, args: argparse.Namespace, settings: Any) -> int:
    from tqdm import tqdm

    from backend.datasets.hub import fetch, fetch_failure
    from backend.datasets.status import dataset_status

    if ds.hub is None:
        print(f"error: {ds.name} declares no hub source: its data is bundled or copied by "
              "hand", file=sys.stderr)
        return 2
    if settings.hub_offline:
        print("error: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: nothing can be downloaded",
              file=sys.stderr)
        return 2
    parts = args.subsets
    if parts and not ds.hub.part_files:
        print(f"note: {ds.hub.repo_id} is fetched whole ({', '.join(ds.hub.files)}); "
              "--subsets selects parts when a job runs", file=sys.stderr)
        parts = None
    unknown = [p for p in parts or [] if ds.hub.configs and p not in ds.hub.configs]
    if unknown:
        print(f"error: unknown part(s) of {ds.name}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    print(f"fetching data: {ds.name} from the hub dataset {ds.hub.repo_id} "
          f"({', '.join(ds.hub.patterns(parts))})", file=sys.stderr)
    bar = tqdm(desc="fetching data", unit="B", unit_scale=True, file=sys.stderr)
    state = {"dataset": ds.name, "state": "running", "bytes_done": 0, "bytes_total": None}

    def progress(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        state.update(bytes_done=done, bytes_total=total)
        _write_progress(args.progress_file, state)

    _write_progress(args.progress_file, state)
    try:
        folder, summary = fetch(ds.hub, parts, progress)
    except Exception as exc:  # noqa: BLE001 - report any hub/network error plainly
        bar.close()
        message = fetch_failure(ds, exc)
        _write_progress(args.progress_file, {**state, "state": "failed", "error": message})
        print(f"error: {message}", file=sys.stderr)
        return 1
    bar.close()
    _write_progress(args.progress_file, {**state, "state": "done",
                                         "bytes_done": summary["bytes"],
                                         "bytes_total": summary["bytes"]})
    print(f"fetched {summary['files']} file(s), {summary['bytes']} bytes in "
          f"{summary['seconds']} s into {folder}")
    status = dataset_status(ds, True, wait=True)
    for part in status["parts"]:
        print(f"  {part['part']:<40} {part['split']:<6} {part['items']} items"
              + ("" if part["default"] else "  (not in a job with the defaults)"))
    return 0


def _status(args: argparse.Namespace, settings: Any) -> int:
    from backend.datasets.base import DataContext
    from backend.datasets.registry import UnknownDataset, dataset_names, get_dataset
    from backend.datasets.status import dataset_status

    names = [args.dataset] if args.dataset else dataset_names()
    if args.tasks:
        return _task_status(args, settings, names)
    out = {}
    for name in names:
        try:
            ds = get_dataset(name, DataContext.of(settings))
        except UnknownDataset as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        out[name] = dataset_status(ds, settings.allow_data_download, settings.hub_offline,
                                   wait=True)
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    for name, st in out.items():
        where = st["where"] or st.get("reason") or ""
        items = "" if st["items"] is None else f", {st['items']} items"
        if len(st.get("items_by_split") or {}) > 1:  # which split a job runs, and the rest
            items += " in a job with the defaults (by split: " + ", ".join(
                f"{split} {n}" for split, n in st["items_by_split"].items()) + ")"
        print(f"{name:<20} {st['state']:<8} {st['source'] or '':<10} {where}{items}")
        if st["state"] == "per_task":
            print(f"{'':<20} per task: "
                  f"{lbs_command(f'data status {name} --tasks arc_easy ...')}")
        if st["state"] == "missing" and st["how"].get("fetch_command"):
            print(f"{'':<20} get it: {st['how']['fetch_command']}  (hub: "
                  f"{st['how']['hub']['repo_id']}; or copy into {st['how']['copy_to']})")
    return 0


def _task_status(args: argparse.Namespace, settings: Any, names: list[str]) -> int:
    from backend.datasets import lm_eval_catalog as catalog
    from backend.datasets.base import DataContext
    from backend.datasets.registry import get_dataset

    ds = get_dataset(names[0], DataContext.of(settings)) if names else None
    if ds is None or not ds.data_per_task:
        print("error: --tasks is for lm_eval: data status lm_eval --tasks ...",
              file=sys.stderr)
        return 2
    rows = _task_rows(ds, settings)
    index = catalog.by_name(rows)
    out = {}
    for asked in args.tasks:
        if asked not in index:
            out[asked] = {"state": "unknown_task"}
            continue
        for leaf in catalog.leaves(asked, index):
            out[leaf] = catalog.task_data(index[leaf], settings.hf_datasets_cache)
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        for task, st in out.items():
            where = st.get("where") or st.get("hub") or ""
            print(f"{task:<40} {st['state']:<8} {st.get('source') or '':<6} {where}")
        missing = [t for t, st in out.items() if st["state"] == "missing"]
        if missing:
            print(f"get it: {catalog.fetch_command(missing)}")
    return 0 if all(st["state"] != "unknown_task" for st in out.values()) else 2
