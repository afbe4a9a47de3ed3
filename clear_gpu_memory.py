"""Maintenance: show what holds GPU memory, and which processes are this project's workers.

    python clear_gpu_memory.py [--json]

With NVIDIA's NVML (nvidia-ml-py) and a driver it lists each GPU's used/total
memory and the processes using it, marking LLM Bench Shower workers (from the
workers table of the configured database). Without a GPU it says so and shows
RAM and the workers' RSS. It changes nothing: asking the server to offload or
release models, and ending stale workers, come with the model manager's issue.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import psutil

MB = 1024 * 1024


def _workers() -> dict[int, dict[str, Any]]:
    from backend.config import load_settings
    from backend.db import session_factory
    from backend.jobs import list_workers

    try:
        rows = list_workers(session_factory(load_settings().database_url))
    except Exception as exc:  # noqa: BLE001 - a report must still print without a database
        print(f"note: cannot read the workers table: {exc}", file=sys.stderr)
        return {}
    return {w.pid: {"id": w.id, "state": w.state, "heartbeat_at": w.heartbeat_at.isoformat()}
            for w in rows if w.state != "stopped"}


def _process(pid: int, workers: dict[int, dict[str, Any]]) -> dict[str, Any]:
    try:
        proc = psutil.Process(pid)
        name, rss = " ".join(proc.cmdline()[:3]) or proc.name(), proc.memory_info().rss
    except psutil.Error:
        name, rss = "?", None
    return {"pid": pid, "command": name, "rss_mb": None if rss is None else round(rss / MB, 1),
            "lbs_worker": workers.get(pid)}


def gpu_report(workers: dict[int, dict[str, Any]]) -> list[dict[str, Any]] | None:
    """One entry per GPU, or None when NVML or a driver is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError or NVMLError: no GPU to report
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            gpus.append({
                "index": i, "name": pynvml.nvmlDeviceGetName(handle),
                "used_mb": round(mem.used / MB, 1), "total_mb": round(mem.total / MB, 1),
                "processes": [{**_process(p.pid, workers),
                               "gpu_mb": round((p.usedGpuMemory or 0) / MB, 1)}
                              for p in procs]})
        return gpus
    finally:
        pynvml.nvmlShutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    workers = _workers()
    vm = psutil.virtual_memory()
    report = {"gpus": gpu_report(workers),
              "ram": {"used_mb": round((vm.total - vm.available) / MB, 1),
                      "total_mb": round(vm.total / MB, 1)},
              "workers": [_process(pid, workers) for pid in workers]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if report["gpus"] is None:
        print("No NVIDIA GPU found (no NVML or no driver): nothing holds GPU memory here.")
    else:
        for gpu in report["gpus"]:
            print(f"GPU {gpu['index']} {gpu['name']}: {gpu['used_mb']:.0f} / "
                  f"{gpu['total_mb']:.0f} MB used")
            for p in gpu["processes"]:
                mark = f"  [LBS worker {p['lbs_worker']['id']}]" if p["lbs_worker"] else ""
                print(f"  pid {p['pid']:>7}  {p['gpu_mb']:>9.0f} MB  {p['command']}{mark}")
    ram = report["ram"]
    print(f"RAM: {ram['used_mb']:.0f} / {ram['total_mb']:.0f} MB used")
    for w in report["workers"]:
        print(f"  LBS worker pid {w['pid']}: RSS {w['rss_mb']} MB, "
              f"{w['lbs_worker']['state']}, heartbeat {w['lbs_worker']['heartbeat_at']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
