"""Maintenance: show what holds GPU memory, free it, and end stale workers.

    python clear_gpu_memory.py [--release | --offload | --keep-models] [--kill-stale [--yes]]
                               [--dry-run] [--json] [--server URL] [--stale-after S] [--grace S]

1. Report. Each GPU's used/total memory and the processes using it (NVML),
   marking this project's workers (the workers table of the configured
   database) and whether their heartbeat is fresh; a process whose GPU use the
   driver does not report shows "unknown", and inside a container (another PID
   namespace than the host's) NVML's PIDs are the host's, so they are not looked
   up among this container's processes; without a GPU, the RAM and
   the workers' RSS; and the models the running server's workers hold.
2. Ask the running server (`--server`, default LBS_SERVER_URL) to release
   every model (the default, POST /api/gpu/release) or to offload them to CPU
   RAM (`--offload`, POST /api/gpu/offload); `--keep-models` asks nothing.
   When no server answers, the default only reports; an explicit `--release`
   or `--offload` then fails.
3. `--kill-stale`: end this machine's workers whose heartbeat is older than
   `--stale-after` seconds (default: max(15, LBS_LEASE_SECONDS), the rule the
   server's /api/workers uses), after a confirmation or `--yes`: SIGTERM (a
   stopped process is continued so it can shut down), then SIGKILL after
   `--grace` seconds. A PID is signalled only while it runs `backend.apps.worker`
   and was started before that worker's last heartbeat (so a recycled PID is
   never hit). Rows of ended or vanished workers are marked stopped.

`--dry-run` shows what would be done and changes nothing; `--json` prints one
JSON document. Exit status: 0 ok, 1 an action failed, 2 bad usage, 3 a running job
holds a model (it is freed when the job ends; run this again then, or cancel the job).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from datetime import timezone
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from backend.apps.client import ApiClient, ServerError
from backend.common.units import MiB

log = logging.getLogger("clear_gpu_memory")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


# --- what is there ------------------------------------------------------------------

def _is_worker_command(cmdline: list[str]) -> bool:
    """A worker's command line: `lbs worker`, `python -m backend.apps.lbs worker` (what
    the server starts), `python -m backend.apps.worker` or the module's file."""
    pairs = list(zip(cmdline, cmdline[1:], strict=False))
    triples = zip(cmdline, cmdline[1:], cmdline[2:], strict=False)
    return any(a == "-m" and b == "backend.apps.worker" for a, b in pairs) \
        or any(a == "-m" and b == "backend.apps.lbs" and c == "worker" for a, b, c in triples) \
        or any(a.rsplit("/", 1)[-1] == "lbs" and b == "worker" for a, b in pairs) \
        or any(a.endswith("backend/apps/worker.py") for a in cmdline)


def _process(pid: int) -> dict[str, Any]:
    """What runs under `pid` now: alive, command, RSS, whether it is a backend.apps.worker."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            cmdline, status = proc.cmdline(), proc.status()
            rss, created = proc.memory_info().rss, proc.create_time()
    except psutil.Error:
        return {"alive": False, "command": None, "rss_mb": None, "is_worker": False}
    return {"alive": status != psutil.STATUS_ZOMBIE, "status": status,
            "command": " ".join(cmdline[:4]) or proc.name(), "rss_mb": round(rss / MiB, 1),
            "is_worker": _is_worker_command(cmdline), "created": created}


def read_workers(settings: Any, stale_after: float) -> list[dict[str, Any]] | None:
    """The workers table's rows that are not stopped, with their heartbeat's age and, for
    this machine, the process behind the PID; None when the database cannot be read."""
    from backend.queue.db import WorkerState, session_factory, utcnow
    from backend.queue.workers import Workers

    url = settings.database_url
    path = sa.engine.make_url(url).database if url.startswith("sqlite") else None
    if path and path != ":memory:" and not Path(path).exists():
        return []  # no database yet, so no worker ever ran here (and do not create one)
    try:
        rows = Workers(session_factory(url), settings.lease_seconds).all()
    except Exception as exc:  # noqa: BLE001 - a report must still print without a database
        log.warning("[Clear] cannot read the workers table: %s", exc)
        return None
    now, host = utcnow(), socket.gethostname()
    workers = []
    for w in rows:
        if w.state == WorkerState.STOPPED.value:
            continue
        age = (now - w.heartbeat_at).total_seconds()
        local = w.host == host
        workers.append({
            "id": w.id, "host": w.host, "pid": w.pid, "device": w.device, "state": w.state,
            "current_job_id": w.current_job_id, "heartbeat_at": w.heartbeat_at.isoformat(),
            "heartbeat_age_s": round(age, 1), "fresh": age <= stale_after, "local": local,
            "process": _process(w.pid) if local else None,
            "_beat_ts": w.heartbeat_at.replace(tzinfo=timezone.utc).timestamp()})
    return workers


INIT_PID_NAMESPACE = 0xEFFFFFFC
"""The inode of the host's (initial) PID namespace (PROC_PID_INIT_INO in the kernel)."""


def in_host_pid_namespace() -> bool:
    """Whether this process sees the host's PIDs. NVML lists the PIDs of the host's
    namespace, so in a container a PID it names is not this container's process of
    that number. Assumed true where /proc/self/ns/pid cannot be read."""
    try:
        link = Path("/proc/self/ns/pid").readlink().name  # "pid:[4026531836]"
    except OSError:
        return True
    return link == f"pid:[{INIT_PID_NAMESPACE}]"


def _gpu_process(pid: int, used: int | None, by_pid: dict[int, str],
                 host_pids: bool) -> dict[str, Any]:
    """One process NVML lists on a GPU: its command and worker, looked up only when its
    PID is one of this namespace's; `gpu_mb` None where the driver does not say."""
    return {"pid": pid, "gpu_mb": None if used is None else round(used / MiB, 1),
            "host_pid": not host_pids,
            "command": _process(pid)["command"] if host_pids else None,
            "lbs_worker": by_pid.get(pid) if host_pids else None}


def gpu_report(workers: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """One entry per GPU with the processes using it, or None without NVML or a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError or NVMLError: no GPU to report
        return None
    by_pid = {w["pid"]: w["id"] for w in workers if w["process"] and w["process"]["is_worker"]}
    host_pids = in_host_pid_namespace()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            gpus.append({
                "index": i, "name": pynvml.nvmlDeviceGetName(handle),
                "used_mb": round(mem.used / MiB, 1), "total_mb": round(mem.total / MiB, 1),
                "processes": [_gpu_process(p.pid, p.usedGpuMemory, by_pid, host_pids)
                              for p in procs]})
        return gpus
    except pynvml.NVMLError as exc:
        log.warning("[Clear] NVML failed: %s", exc)
        return None
    finally:
        pynvml.nvmlShutdown()


# --- the server ----------------------------------------------------------------------

def server_report(url: str, token: str) -> dict[str, Any]:
    try:
        status = ApiClient(url, token).call("GET", "/api/gpu/status", timeout=10)
    except ServerError as exc:
        return {"url": url, "reachable": exc.status is not None, "error": str(exc),
                "models": []}
    return {"url": url, "reachable": True, "error": None,
            "models": [{"model_name": m["model_name"], "location": m["location"],
                        "worker_id": m["worker_id"], "pinned": m.get("pinned", False),
                        "stale": m.get("stale", False)}
                       for m in status.values()]}


def _held_by_job(message: str, workers: list[dict[str, Any]] | None) -> str:
    """A worker's refusal (a model in use by a running job) in the user's words: which
    job holds it and what to do."""
    running = [w for w in workers or [] if w.get("current_job_id") is not None]
    which = ", ".join(f"job {w['current_job_id']} on worker {w['id']}" for w in running)
    return (f"{message}{f' ({which})' if which else ''}: the job holds the model while it "
            "runs, and its memory is freed when the job ends; run this again then, or "
            "cancel the job first (the Queue page, or POST /api/jobs/<id>/cancel)")


def ask_server(action: str, server: dict[str, Any], token: str, explicit: bool,
               dry_run: bool, workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Release or offload every model through the server; the action's outcome (`busy`
    when a running job holds a model: `workers` name the job). Models of stale workers
    are not asked: only live workers take commands."""
    models = [m["model_name"] for m in server["models"] if not m["stale"]]
    entry: dict[str, Any] = {"action": action, "target": server["url"], "dry_run": dry_run}
    if not server["reachable"]:
        return {**entry, "ok": not explicit, "message": server["error"] + (
            "" if explicit else f"; no models were asked to {action}")}
    if dry_run:
        return {**entry, "ok": True, "message": f"would ask the server to {action} "
                f"{len(models)} model(s): {', '.join(models) or 'none'}"}
    try:
        data = ApiClient(server["url"], token).call("POST", f"/api/gpu/{action}", {})
    except ServerError as exc:
        if exc.code == "no_worker":  # nothing runs, so nothing holds memory
            return {**entry, "ok": True, "message": f"{exc.message}: nothing to {action}"}
        if exc.code == "busy":
            return {**entry, "ok": False, "busy": True,
                    "message": f"could not {action}: {_held_by_job(exc.message, workers)}"}
        return {**entry, "ok": False, "message": f"the server could not {action}: {exc}"}
    done = data.get("released" if action == "release" else "offloaded", [])
    names = [e.get("model") or e.get("model_name") or "?" for e in done]
    failed = [a for a in data["workers"] if not a["ok"]]
    past = {"release": "released", "offload": "offloaded"}[action]
    message = f"{past} {len(done)} model(s): {', '.join(names) or 'none'}"
    if action == "release" and done:
        message += f"; the workers' RSS fell by {data['freed_rss_mb']} MiB"
    notes = {a["result"]["message"] for a in data["workers"]
             if a["ok"] and a["result"] and a["result"].get("message")}
    message += "".join(f" ({n})" for n in sorted(notes))
    message += "".join(f"; worker {a['worker_id']} failed: {a['error']}" for a in failed)
    return {**entry, "ok": not failed, "message": message, "result": data}


# --- stale workers -------------------------------------------------------------------

def _ended(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # exited; its parent reaps it later
    except psutil.NoSuchProcess:
        return True


def _wait_end(proc: psutil.Process, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not _ended(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def end_process(pid: int, created: float, grace: float) -> str:
    """SIGTERM `pid` (continuing it if stopped), SIGKILL it after `grace` s; the signal
    that ended it. `created` is the create time the plan saw: a different process now
    under that PID (or one that is not a worker) raises RuntimeError untouched."""
    proc = psutil.Process(pid)
    if abs(proc.create_time() - created) > 0.01 or not _is_worker_command(proc.cmdline()):
        raise RuntimeError(f"pid {pid} is no longer the worker's process; left alone")
    try:
        proc.terminate()
        if proc.status() == psutil.STATUS_STOPPED:
            proc.resume()  # a stopped process acts on SIGTERM only once it runs again
    except psutil.NoSuchProcess:
        return "SIGTERM"
    if _wait_end(proc, grace):
        return "SIGTERM"
    log.info("[Clear] pid %d ignored SIGTERM for %.0f s; sending SIGKILL", pid, grace)
    try:
        proc.kill()
    except psutil.NoSuchProcess:
        return "SIGKILL"
    if _wait_end(proc, 5.0):
        return "SIGKILL"
    raise RuntimeError(f"pid {pid} is still running after SIGKILL")


def plan_kills(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each stale worker row of this machine: kill its process, or only forget the
    row (process gone, PID recycled by another program), with the reason."""
    fresh_pids = {w["pid"] for w in workers if w["fresh"] and w["local"]}
    plans = []
    for w in workers:
        if w["fresh"] or not w["local"]:
            continue
        proc, step = w["process"], {"worker_id": w["id"], "pid": w["pid"]}
        if not proc["alive"]:
            plans.append({**step, "do": "forget", "why": "its process is gone"})
        elif not proc["is_worker"] or w["pid"] in fresh_pids \
                or proc["created"] > w["_beat_ts"] + 1.0:
            plans.append({**step, "do": "forget",
                          "why": f"pid {w['pid']} now belongs to another process "
                                 f"({proc['command']}); it is left alone"})
        else:
            plans.append({**step, "do": "kill", "created": proc["created"],
                          "why": f"no heartbeat for {w['heartbeat_age_s']:.0f} s"})
    return plans


def confirm(plans: list[dict[str, Any]]) -> bool | None:
    """Ask on the terminal; None when there is no terminal to ask on."""
    if not sys.stdin.isatty():
        return None
    pids = ", ".join(str(p["pid"]) for p in plans if p["do"] == "kill")
    sys.stderr.write(f"End the stale worker process(es) {pids}? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def kill_stale(plans: list[dict[str, Any]], settings: Any, grace: float,
               dry_run: bool) -> list[dict[str, Any]]:
    from backend.queue.db import WorkerState, session_factory
    from backend.queue.workers import Workers

    workers = None if dry_run else Workers(session_factory(settings.database_url),
                                           settings.lease_seconds)
    actions = []
    for plan in plans:
        entry = {"action": plan["do"], "target": plan["worker_id"], "pid": plan["pid"],
                 "dry_run": dry_run, "ok": True}
        verb = "end" if plan["do"] == "kill" else "mark stopped"
        if dry_run:
            actions.append({**entry, "message": f"would {verb} worker {plan['worker_id']} "
                                                f"(pid {plan['pid']}): {plan['why']}"})
            continue
        try:
            if plan["do"] == "kill":
                how = end_process(plan["pid"], plan["created"], grace)
                message = f"ended worker {plan['worker_id']} (pid {plan['pid']}, {how}): " \
                          f"{plan['why']}"
            else:
                message = f"marked worker {plan['worker_id']} stopped: {plan['why']}"
            workers.heartbeat(plan["worker_id"], state=WorkerState.STOPPED.value)
            actions.append({**entry, "message": message})
        except (psutil.Error, RuntimeError, OSError, sa.exc.SQLAlchemyError) as exc:
            actions.append({**entry, "ok": False,
                            "message": f"could not end pid {plan['pid']}: {exc}"})
    return actions


# --- output --------------------------------------------------------------------------

def print_report(report: dict[str, Any]) -> None:
    if report["gpus"] is None:
        print("No NVIDIA GPU found (no NVML or no driver): nothing holds GPU memory here.")
    for gpu in report["gpus"] or []:
        print(f"GPU {gpu['index']} {gpu['name']}: {gpu['used_mb']:.0f} / "
              f"{gpu['total_mb']:.0f} MiB used")
        for p in gpu["processes"]:
            mark = f"  [LBS worker {p['lbs_worker']}]" if p["lbs_worker"] else ""
            used = "unknown" if p["gpu_mb"] is None else f"{p['gpu_mb']:.0f}"
            command = "(host PID, not in this PID namespace: its command is not visible " \
                "here)" if p["host_pid"] else p["command"]
            print(f"  pid {p['pid']:>7}  {used:>9} MiB  {command}{mark}")
    ram = report["ram"]
    print(f"RAM: {ram['used_mb']:.0f} / {ram['total_mb']:.0f} MiB used")
    workers = report["workers"]
    if workers is None:
        print("Workers: the database could not be read.")
    else:
        print(f"Workers: {len(workers) or 'none'} registered "
              f"(stale after {report['stale_after_s']:g} s without a heartbeat)")
    for w in workers or []:
        proc = w["process"]
        where = f"on {w['host']}" if not w["local"] else (
            f"RSS {proc['rss_mb']} MiB" if proc["alive"] else "process gone")
        fresh = "fresh" if w["fresh"] else "STALE"
        print(f"  worker {w['id']} pid {w['pid']} ({w['device']}, {w['state']}): {where}, "
              f"heartbeat {w['heartbeat_age_s']:.0f} s ago ({fresh})")
    server = report["server"]
    if not server["reachable"]:
        print(f"Server: {server['error']}")
    else:
        models = ", ".join(f"{m['model_name']} ({m['location']}, {m['worker_id']}"
                           f"{', stale' if m['stale'] else ''})"
                           for m in server["models"]) or "none"
        print(f"Server {server['url']}: models held: {models}")
    for action in report["actions"]:
        mark = "" if action["ok"] else "FAILED: "
        print(f"{'[dry run] ' if action['dry_run'] else ''}{mark}{action['message']}")
    if report.get("gpus_after"):
        for gpu in report["gpus_after"]:
            print(f"GPU {gpu['index']} now: {gpu['used_mb']:.0f} / {gpu['total_mb']:.0f} MiB used")


def parse_args(argv: list[str] | None, prog: str = "clear_gpu_memory.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, epilog=f"example: {prog} --dry-run",
        description="Show what holds GPU memory, ask the server to release (or offload) "
                    "its models, and end stale workers.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--release", action="store_true",
                        help="ask the server to release every model (the default when a "
                             "server answers)")
    action.add_argument("--offload", action="store_true",
                        help="ask the server to offload every model to CPU RAM")
    action.add_argument("--keep-models", action="store_true",
                        help="ask the server for nothing")
    parser.add_argument("--kill-stale", action="store_true",
                        help="end this machine's workers whose heartbeat is stale")
    parser.add_argument("--yes", action="store_true", help="end them without asking")
    parser.add_argument("--dry-run", action="store_true",
                        help="show what would be done; change nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--server", help="the server's URL (default: LBS_SERVER_URL)")
    parser.add_argument("--stale-after", type=float, metavar="S",
                        help="a heartbeat older than this is stale "
                             "(default: max(15, LBS_LEASE_SECONDS))")
    parser.add_argument("--grace", type=float, default=10.0, metavar="S",
                        help="seconds between SIGTERM and SIGKILL (default 10)")
    args = parser.parse_args(argv)
    if args.stale_after is not None and args.stale_after <= 0:
        parser.error("--stale-after must be greater than 0")
    if args.grace < 0:
        parser.error("--grace must be at least 0")
    return args


def main(argv: list[str] | None = None, prog: str = "clear_gpu_memory.py") -> int:
    args = parse_args(argv, prog)
    from backend.common.config import load_settings_or_report
    from backend.common.logs import setup_logging
    from backend.queue.scheduling import stale_after as default_stale_after

    settings = load_settings_or_report()
    if settings is None:
        return EXIT_USAGE
    setup_logging("WARNING" if args.json else settings.log_level)
    stale_after = args.stale_after or default_stale_after(settings.lease_seconds).total_seconds()
    url = (args.server or settings.server_url).rstrip("/")

    workers = read_workers(settings, stale_after)
    vm = psutil.virtual_memory()
    report: dict[str, Any] = {
        "gpus": gpu_report(workers or []),
        "ram": {"used_mb": round((vm.total - vm.available) / MiB, 1),
                "total_mb": round(vm.total / MiB, 1)},
        "workers": workers, "stale_after_s": stale_after,
        "server": server_report(url, settings.api_token), "actions": []}
    if not report["server"]["reachable"]:
        log.warning("[Clear] %s", report["server"]["error"])

    if not args.keep_models:
        action = "offload" if args.offload else "release"
        report["actions"].append(ask_server(action, report["server"], settings.api_token,
                                            args.release or args.offload, args.dry_run,
                                            workers))
    code = EXIT_OK
    if args.kill_stale:
        if workers is None:
            report["actions"].append({"action": "kill", "target": None, "dry_run": args.dry_run,
                                      "ok": False, "message": "cannot read the workers table"})
        else:
            plans = plan_kills(workers)
            kills = [p for p in plans if p["do"] == "kill"]
            answer = True if (args.yes or args.dry_run or not kills) else confirm(plans)
            if answer is None:
                log.error("[Clear] %d stale worker(s) to end, and no terminal to ask on: "
                          "pass --yes to end them (or --dry-run to see them)", len(kills))
                code = EXIT_USAGE
            elif not answer:
                report["actions"].append({"action": "kill", "target": None, "ok": True,
                                          "dry_run": False, "message": "left the stale "
                                          "workers alone (not confirmed)"})
            else:
                report["actions"] += kill_stale(plans, settings, args.grace, args.dry_run)
    if report["gpus"] and any(not a["dry_run"] for a in report["actions"]):
        report["gpus_after"] = gpu_report(workers or [])
    for w in workers or []:
        w.pop("_beat_ts", None)
        if w["process"]:
            w["process"].pop("created", None)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        for action in (a for a in report["actions"] if not a["ok"]):  # beside the JSON
            log.error("[Clear] %s", action["message"])
    else:
        print_report(report)  # says each failure once, marked FAILED
    failed = [a for a in report["actions"] if not a["ok"]]
    if code == EXIT_OK and failed:
        code = EXIT_BUSY if all(a.get("busy") for a in failed) else EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
