"""clear_gpu_memory.py run as a subprocess: the report, asking a real server to release or
offload its workers' models, and ending stale workers (real ones, made stale with SIGSTOP,
and stand-in processes for the cases a real worker cannot show)."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

from tests.conftest import ECHO_PLUGIN, ROOT, LiveServer, free_port, queue_on

SCRIPT = str(ROOT / "clear_gpu_memory.py")
TOKEN = "clear-test-token"


def run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def run_json(env: dict[str, str], *args: str, code: int = 0) -> dict:
    proc = run_script(env, "--json", *args)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def _no_gpu() -> bool:
    from backend.engine.memory.gpu import visible_gpu_count

    return visible_gpu_count(None) == 0


# --- without a server ---------------------------------------------------------------

def test_models_of_stale_workers_are_not_asked():
    """The server lists a stale worker's last status (marked stale), but only live workers
    take commands: the script neither counts nor asks for those models."""
    from clear_gpu_memory import ask_server

    server = {"url": "http://127.0.0.1:1", "reachable": True, "error": None, "models": [
        {"model_name": "a", "location": "CPU", "worker_id": "live", "pinned": False,
         "stale": False},
        {"model_name": "b", "location": "GPU", "worker_id": "gone", "pinned": False,
         "stale": True}]}
    action = ask_server("release", server, TOKEN, explicit=False, dry_run=True)
    assert action["message"] == "would ask the server to release 1 model(s): a"


def test_no_server_is_reported_clearly(data_dir):
    env, url = dict(os.environ), f"http://127.0.0.1:{free_port()}"

    proc = run_script(env, "--server", url)  # the default action only reports then
    assert proc.returncode == 0, proc.stderr
    assert f"no server answers at {url}" in proc.stdout
    if _no_gpu():
        assert "No NVIDIA GPU found" in proc.stdout and "RAM:" in proc.stdout

    proc = run_script(env, "--release", "--server", url)  # an explicit action fails
    assert proc.returncode == 1
    assert f"FAILED: no server answers at {url}" in proc.stdout
    assert "[Clear]" in proc.stderr

    report = run_json(env, "--offload", "--server", url, code=1)
    assert report["server"]["reachable"] is False and report["workers"] == []
    assert [(a["action"], a["ok"]) for a in report["actions"]] == [("offload", False)]
    assert not (data_dir / "lbs.sqlite3").exists()  # a report creates no database


@pytest.mark.parametrize("args", [["--release", "--offload"], ["--stale-after", "0"],
                                  ["--no-such-flag"]])
def test_bad_usage_exits_2(args):
    assert run_script(dict(os.environ), *args).returncode == 2


def _sleeper(*extra: str, ignore_term: bool = False) -> subprocess.Popen:
    """A stand-in process; with extra=('-m', 'backend.apps.worker') its command line is a
    worker's. It prints once its SIGTERM handling is in place."""
    code = ("import signal, sys, time\n"
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
            + "print('ready', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, *extra], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


FAKE_NVML = '''
"""A stand-in for nvidia-ml-py: one 80 GB GPU used by the PIDs in FAKE_NVML_PIDS."""
import os
from types import SimpleNamespace


class NVMLError(Exception):
    pass


def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetName(handle): return "Fake GPU"
def nvmlDeviceGetMemoryInfo(handle):
    return SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)
def nvmlDeviceGetComputeRunningProcesses(handle):
    # pynvml gives usedGpuMemory None where the driver does not report it
    used = None if os.environ.get("FAKE_NVML_USED") == "unknown" else 2**30
    return [SimpleNamespace(pid=int(p), usedGpuMemory=used)
            for p in os.environ["FAKE_NVML_PIDS"].split(",")]
'''


def test_gpu_report_marks_the_workers_processes(factory, tmp_path):
    """The NVML path (no GPU here: a stand-in pynvml module shows one)."""

    (tmp_path / "fake_nvml").mkdir()
    (tmp_path / "fake_nvml" / "pynvml.py").write_text(FAKE_NVML)
    worker, other = _sleeper("-m", "backend.apps.worker"), _sleeper()
    try:
        queue_on(factory).workers.register("w1", socket.gethostname(), worker.pid,
                                           "cuda:0 (Fake GPU)")
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake_nvml"),
               "FAKE_NVML_PIDS": f"{worker.pid},{other.pid}"}
        server = ("--server", f"http://127.0.0.1:{free_port()}")
        report = run_json(env, *server)
        (gpu,) = report["gpus"]
        assert (gpu["name"], gpu["used_mb"], gpu["total_mb"]) == ("Fake GPU", 3072, 81920)
        marks = {p["pid"]: p["lbs_worker"] for p in gpu["processes"]}
        assert marks == {worker.pid: "w1", other.pid: None}
        assert [w["fresh"] for w in report["workers"]] == [True]

        proc = run_script(env, *server)
        assert "GPU 0 Fake GPU: 3072 / 81920 MiB used" in proc.stdout
        assert f"pid {worker.pid:>7}       1024 MiB" in proc.stdout
        assert "[LBS worker w1]" in proc.stdout
    finally:
        for p in (worker, other):
            p.kill()
            p.wait()


def _fake_nvml_env(tmp_path, pids: str, **extra: str) -> dict[str, str]:
    (tmp_path / "fake_nvml").mkdir(exist_ok=True)
    (tmp_path / "fake_nvml" / "pynvml.py").write_text(FAKE_NVML)
    return {**os.environ, "PYTHONPATH": str(tmp_path / "fake_nvml"), "FAKE_NVML_PIDS": pids,
            **extra}


def test_a_process_whose_gpu_use_nvml_cannot_tell_is_shown_as_unknown(data_dir, tmp_path):
    """Not as 0 MiB, which reads as "holds nothing"."""
    other = _sleeper()
    try:
        env = _fake_nvml_env(tmp_path, str(other.pid), FAKE_NVML_USED="unknown")
        server = ("--server", f"http://127.0.0.1:{free_port()}")
        (gpu,) = run_json(env, *server)["gpus"]
        assert [p["gpu_mb"] for p in gpu["processes"]] == [None]
        proc = run_script(env, *server)
        assert f"pid {other.pid:>7}    unknown MiB" in proc.stdout
        assert " 0 MiB" not in proc.stdout
    finally:
        other.kill()
        other.wait()


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-Urpf", "--mount-proc", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare for a PID namespace")
def test_in_a_pid_namespace_host_pids_are_not_looked_up_locally(data_dir, tmp_path):
    """In a container NVML lists the host's PIDs: PID 1 there is not this container's
    PID 1 (here the script itself, started by unshare in a fresh PID namespace), so the
    report says the PID is the host's instead of naming a local process."""
    env = _fake_nvml_env(tmp_path, "1")
    proc = subprocess.run(["unshare", "-Urpf", "--mount-proc", sys.executable, SCRIPT,
                           "--json", "--server", f"http://127.0.0.1:{free_port()}"],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (gpu,) = json.loads(proc.stdout)["gpus"]
    (listed,) = gpu["processes"]
    assert listed["command"] is None and listed["host_pid"] is True
    text = subprocess.run(["unshare", "-Urpf", "--mount-proc", sys.executable, SCRIPT,
                           "--server", f"http://127.0.0.1:{free_port()}"],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert "pid       1" in text.stdout
    assert "host PID, not in this PID namespace" in text.stdout
    assert "clear_gpu_memory" not in text.stdout


def test_kill_stale_spares_recycled_pids_and_other_hosts(factory):
    from backend.queue.db import WorkerRow, utcnow

    host = socket.gethostname()
    hung = _sleeper("-m", "backend.apps.worker", ignore_term=True)  # a worker stuck for good
    unrelated = _sleeper()  # a program that got a dead worker's PID
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    procs = [hung, unrelated]
    for worker_id, pid, where in (("hung", hung.pid, host), ("recycled", unrelated.pid, host),
                                  ("gone", dead.pid, host), ("remote", hung.pid, "elsewhere")):
        queue_on(factory).workers.register(worker_id, where, pid, "cpu")
    time.sleep(1.5)  # every heartbeat is now older than --stale-after 1
    # A worker-looking process started after the row's last heartbeat: its PID was reused.
    newcomer = _sleeper("-m", "backend.apps.worker")
    procs.append(newcomer)
    queue_on(factory).workers.register("reused", host, newcomer.pid, "cpu")
    with factory.begin() as session:
        session.execute(sa.update(WorkerRow).where(WorkerRow.id == "reused")
                        .values(heartbeat_at=utcnow() - timedelta(hours=1)))
    env = dict(os.environ)
    args = ("--kill-stale", "--keep-models", "--stale-after", "1", "--grace", "1")

    def states() -> dict[str, str]:
        with factory() as session:
            return dict(session.execute(sa.select(WorkerRow.id, WorkerRow.state)).all())

    try:
        proc = run_script(env, *args)  # no terminal to confirm on, and no --yes
        assert proc.returncode == 2 and "--yes" in proc.stderr
        assert all(p.poll() is None for p in procs)

        main_fd, term = pty.openpty()  # on a terminal it asks; "n" leaves them alone
        os.write(main_fd, b"n\n")
        try:
            proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env,
                                  stdin=term, capture_output=True, text=True, timeout=120)
        finally:
            os.close(term)
            os.close(main_fd)
        assert proc.returncode == 0, proc.stderr
        assert f"End the stale worker process(es) {hung.pid}? [y/N]" in proc.stderr
        assert "left the stale workers alone" in proc.stdout
        assert all(p.poll() is None for p in procs)

        report = run_json(env, *args, "--dry-run")
        assert {w["id"]: w["fresh"] for w in report["workers"]} == dict.fromkeys(
            ("hung", "recycled", "gone", "remote", "reused"), False)
        planned = {a["target"]: a["action"] for a in report["actions"]}
        assert planned == {"hung": "kill", "recycled": "forget", "gone": "forget",
                           "reused": "forget"}
        assert all(a["dry_run"] and "would" in a["message"] for a in report["actions"])
        assert all(p.poll() is None for p in procs) and set(states().values()) == {"idle"}

        report = run_json(env, *args, "--yes")
        assert hung.wait(10) == -signal.SIGKILL  # it ignored SIGTERM for the grace period
        kill = next(a for a in report["actions"] if a["action"] == "kill")
        assert kill["ok"] and kill["pid"] == hung.pid and "SIGKILL" in kill["message"]
        assert unrelated.poll() is None and newcomer.poll() is None
        assert states() == {"hung": "stopped", "recycled": "stopped", "gone": "stopped",
                            "reused": "stopped", "remote": "idle"}
    finally:
        for p in procs:
            p.kill()
            p.wait()


# --- against a real server and its workers -------------------------------------------

def _stop_outside_write(pid: int) -> None:
    """SIGSTOP `pid` at a moment it holds no SQLite write lock, so that the stopped
    process cannot block the live worker's heartbeat."""
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)
        locks = Path("/proc/locks").read_text().splitlines()
        if not any(f" WRITE {pid} " in line for line in locks):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} kept holding a database write lock")


@pytest.mark.slow
def test_release_offload_and_kill_stale_with_a_live_server(with_tiny, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "echo_dataset.py").write_text(ECHO_PLUGIN)
    # Two real workers, heartbeating every second (a quarter of the lease).
    server = LiveServer(with_tiny, env={"LBS_WORKERS": "2", "LBS_LEASE_SECONDS": "4",
                                        "LBS_PLUGIN_DIRS": str(plugins),
                                        "LBS_API_TOKEN": TOKEN}).start()
    try:
        deadline = time.monotonic() + 90
        while True:
            workers = server.request("GET", "/api/workers")[1]["data"]["workers"]
            stats = server.request("GET", "/api/v1/memory/stats")[1]["data"]
            if len(stats["workers"]) == 2 and all(w["alive"] for w in workers):
                break
            assert time.monotonic() < deadline, server.log()[-4000:]
            time.sleep(0.2)
        status, body = server.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "echo", "params": {"words": ["apple"]}})
        assert status == 201, body
        job = server.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"))
        assert job["state"] == "succeeded", job["error"]

        def held() -> list[str]:
            return [m["model_name"] for m in
                    server.request("GET", "/api/v1/memory/models")[1]["data"]["models"]]

        deadline = time.monotonic() + 10
        while not held() and time.monotonic() < deadline:
            time.sleep(0.2)  # workers publish their status about once a second
        assert held() == ["builtin:tiny"]  # a cached dataset keeps its model
        env = server.env

        report = run_json(env, "--dry-run")
        assert {w["pid"] for w in report["workers"]} == {w["pid"] for w in workers}
        for w in report["workers"]:
            assert w["fresh"] and w["local"] and w["process"]["is_worker"]
            assert w["process"]["rss_mb"] > 50
        assert report["stale_after_s"] == 15.0  # max(15, LBS_LEASE_SECONDS)
        assert [m["model_name"] for m in report["server"]["models"]] == ["builtin:tiny"]
        assert [(a["action"], a["dry_run"], a["message"]) for a in report["actions"]] == [
            ("release", True, "would ask the server to release 1 model(s): builtin:tiny")]
        assert held() == ["builtin:tiny"]

        no_token = {k: v for k, v in env.items() if k != "LBS_API_TOKEN"}
        proc = run_script(no_token, "--release")
        assert proc.returncode == 1 and "LBS_API_TOKEN" in proc.stdout
        assert held() == ["builtin:tiny"]

        proc = run_script(env, "--offload")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if _no_gpu():
            assert "offloaded 0 model(s)" in proc.stdout and "no GPU" in proc.stdout
            assert held() == ["builtin:tiny"]

        proc = run_script(env)  # release is the default
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "released 1 model(s): builtin:tiny" in proc.stdout
        assert held() == []

        # Make one worker stale: stopped, it cannot heartbeat.
        stale, live = sorted(workers, key=lambda w: w["pid"])
        _stop_outside_write(stale["pid"])
        time.sleep(4)
        report = run_json(env, "--kill-stale", "--yes", "--keep-models", "--stale-after", "3")
        fresh = {w["pid"]: w["fresh"] for w in report["workers"]}
        assert fresh[stale["pid"]] is False and fresh[live["pid"]] is True
        assert [(a["action"], a["pid"], a["ok"]) for a in report["actions"]] == [
            ("kill", stale["pid"], True)]
        assert "SIGTERM" in report["actions"][0]["message"]  # continued, it shut down
        assert not psutil.pid_exists(stale["pid"]) or \
            psutil.Process(stale["pid"]).status() == psutil.STATUS_ZOMBIE
        assert psutil.Process(live["pid"]).status() != psutil.STATUS_ZOMBIE
        assert server.proc.poll() is None
    finally:
        server.stop()


@pytest.mark.parametrize("cmdline, worker", [
    (["/venv/bin/python", "-m", "backend.apps.lbs", "worker", "--parent-pid", "1"], True),
    (["/venv/bin/python", "/venv/bin/lbs", "worker", "--gpus", "0"], True),
    (["/venv/bin/python", "-m", "backend.apps.worker"], True),
    (["/venv/bin/python", "/venv/bin/lbs", "serve"], False),
    (["/venv/bin/python", "-m", "backend.apps.lbs", "eval", "worker"], False),
    (["bash", "-c", "sleep 1"], False),
])
def test_worker_command_lines_in_every_form(cmdline, worker):
    """Only a worker is ever signalled, however it was started (the server starts
    `python -m backend.apps.lbs worker`; a user types `lbs worker`)."""
    from clear_gpu_memory import _is_worker_command

    assert _is_worker_command(cmdline) is worker


def test_a_model_held_by_a_running_job_is_explained_once(factory, data_dir):
    """Releasing while a job runs: the server answers 409 busy (the worker's ModelBusy);
    the script says which job holds the model and what to do, once, and exits 3."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


    queue_on(factory).workers.register("w1", socket.gethostname(), os.getpid(), "cpu",
                                       current_job_id=7)

    class Server(BaseHTTPRequestHandler):  # the API's answers while job 7 runs on w1
        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's name
            self._answer(200, {"status": "success", "data": {"builtin:tiny": {
                "model_name": "builtin:tiny", "location": "CPU", "worker_id": "w1",
                "pinned": False, "stale": False}}})

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(409, {"status": "error", "error": {
                "code": "busy", "message": "builtin:tiny is in use by a running job",
                "details": []}})

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        proc = run_script(dict(os.environ), "--release", "--server", url)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 3, out
        assert out.count("in use by a running job") == 1, out
        assert "job 7" in out and "worker w1" in out
        assert "when the job ends" in out and "cancel" in out
        assert "HTTP 409" not in out
        report = run_json(dict(os.environ), "--release", "--server", url, code=3)
        assert report["actions"][0]["busy"] is True
    finally:
        httpd.shutdown()
