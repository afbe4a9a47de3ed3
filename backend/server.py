"""The HTTP server: `create_app()` and `python -m backend.server`.

`python -m backend.server` serves the API and the web page with waitress and
starts the worker processes (`LBS_WORKERS`: one per visible GPU, pinned with
CUDA_VISIBLE_DEVICES, or one on CPU), restarting any that dies. The server
process never imports torch: it stays responsive while jobs run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, send_from_directory
from sqlalchemy.exc import SQLAlchemyError

from backend.common.config import (
    ConfigError,
    Settings,
    check_exposure,
    load_settings,
    load_settings_or_report,
)
from backend.common.logs import setup_logging
from backend.common.redact import mask_url
from backend.engine.plugins import load_plugins
from backend.queue.jobs import Queue
from backend.queue.results import Results

log = logging.getLogger(__name__)

FRONTEND = Path(__file__).resolve().parent.parent / "frontend"
MAX_BODY_BYTES = 2 * 1024 * 1024


@dataclass
class AppState:
    """What the views need, kept in `app.extensions["lbs"]`."""

    settings: Settings
    queue: Queue
    results: Results
    workers_spawned_at: float | None = None
    """time.monotonic() when this server last started a worker process (None: it starts
    none): until one registers, a queued job waits for it to start, not for no one."""


def create_app(settings: Settings | None = None,
               test_config: dict[str, Any] | None = None) -> Flask:
    """Build the Flask app: defaults, then the environment (settings), then test_config."""
    from backend.apps.api import (
        cluster,
        compare,
        datasets,
        errors,
        health,
        inputs,
        jobs,
        memory,
        openapi,
        results,
    )

    settings = settings or load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    load_plugins(list(settings.plugin_dirs))
    app = Flask(__name__, static_folder=None)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    app.json.sort_keys = False  # keep schemas in field order: the page builds forms from them
    if test_config:
        app.config.update(test_config)
    queue = Queue.from_settings(settings)
    app.extensions["lbs"] = AppState(settings, queue, Results(queue.factory))
    errors.init_app(app)
    _init_access(app, settings)
    inputs.init_app(app)
    for module in (jobs, datasets, health, memory, openapi, results, compare, cluster):
        app.register_blueprint(module.bp)

    from backend.apps.api.openapi import undocumented

    @app.get("/")
    @undocumented("the web page")
    def index():
        return send_from_directory(FRONTEND, "index.html")

    @app.get("/static/<path:name>")
    @undocumented("the web page's files")
    def static_files(name: str):
        return send_from_directory(FRONTEND, name)

    return app


STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def host_allowed(host_header: str, settings: Settings) -> bool:
    """Whether a request's Host header names this server: its bind address, a loopback
    name, or one of LBS_ALLOWED_HOSTS (with any port). Bound to every address, any IP
    literal also passes: DNS rebinding needs a name, and an address is what the
    client connected to. Everything else (a rebound attacker.example) is refused."""
    import ipaddress

    host = host_header.strip().lower()
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    if not name:
        return False
    allowed = {*LOOPBACK_NAMES, settings.host.lower().strip("[]"),
               *(h.partition("]")[0].strip("[") if h.startswith("[")
                 else h.rpartition(":")[0] if h.count(":") == 1 else h
                 for h in settings.allowed_hosts)}
    if name in allowed or "*" in allowed:
        return True
    if settings.host in WILDCARD_BINDS:
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False
    return False


def _init_access(app: Flask, settings: Settings) -> None:
    """Host check (DNS rebinding), cross-site write refusal (Origin and JSON-only
    bodies), the bearer token (LBS_API_TOKEN) and CORS (LBS_CORS_ORIGINS).

    A page on another site can make the browser send a "simple" request without
    asking first: a form post or a no-cors fetch, whose body can only be text/plain,
    form-urlencoded or multipart. So state-changing requests must carry a JSON body
    (or none at all, e.g. cancel) and, when the browser names an Origin, it must be
    this server's own or one of LBS_CORS_ORIGINS."""
    import hmac

    from flask import request

    from backend.apps.api.errors import error_response

    open_paths = ("/healthz", "/", "/static/")

    @app.before_request
    def _check_host():
        # /healthz says nothing a rebinding page could use; probes may name anything
        if request.path != "/healthz" and not host_allowed(request.host, settings):
            return error_response(
                400, "bad_host", "this server does not answer to that Host name; an "
                "operator can add it to LBS_ALLOWED_HOSTS",
                [{"field": "Host", "message": "not this server's name"}])
        return None

    @app.before_request
    def _refuse_cross_site_writes():
        if request.method not in STATE_CHANGING:
            return None
        origin = request.headers.get("Origin")
        own = request.host_url.rstrip("/")
        if origin is not None and origin != own and origin not in settings.cors_origins:
            return error_response(
                403, "cross_origin", f"requests that change state from the page at "
                f"{origin[:200]!r} are refused (only this server's own page, or "
                "LBS_CORS_ORIGINS)", [{"field": "Origin", "message": "not allowed"}])
        kind = request.mimetype
        has_body = bool(request.content_length) or "chunked" in \
            request.headers.get("Transfer-Encoding", "").lower()
        if (kind or has_body) and kind != "application/json":
            return error_response(
                415, "unsupported_media_type",
                f"send the body as JSON with 'Content-Type: application/json' (got "
                f"{(kind or 'none')[:100]!r})",
                [{"field": "Content-Type", "message": "expected application/json"}])
        return None

    @app.before_request
    def _require_token():
        if not settings.api_token or request.method == "OPTIONS":
            return None
        path = request.path
        if path in open_paths[:2] or path.startswith(open_paths[2]):
            return None
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_token}".encode()):
            return error_response(401, "unauthorized",
                                  "this server needs 'Authorization: Bearer <LBS_API_TOKEN>'")
        return None

    @app.after_request
    def _cors(response):
        origin = request.headers.get("Origin")
        if origin and origin in settings.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        return response


# --- worker processes -------------------------------------------------------------

def restart_delay(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds to wait before restarting a worker that exited `failures` times in a row
    without a healthy run in between: base, doubling each time, at most cap."""
    return min(cap, base * 2 ** max(0, failures - 1))


class WorkerPool:
    """Starts the worker processes and restarts any that exits while the server runs.

    A worker that exits is restarted after `restart_delay` seconds: 1 s after its
    first exit, doubling with each exit that follows a run shorter than
    `healthy_after` seconds, at most 60 s; a run of `healthy_after` seconds or more
    resets the count. A worker that fails at start (a broken driver, a database
    that is down) so does not spin; one that exits after a CUDA error (it gives its
    job back, see worker.py) is replaced within a second.
    """

    healthy_after = 60.0

    def __init__(self, settings: Settings, state: AppState | None = None):
        self.settings = settings
        self.state = state
        self.procs: dict[int, subprocess.Popen] = {}
        self.devices: list[str | None] = []
        self.started_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        """Held while a worker starts and while `stop` takes the list of workers: a
        restart racing the shutdown either finishes first (and is stopped with the
        rest) or sees `stopping` and starts nothing."""

    def plan(self) -> list[str | None]:
        """CUDA_VISIBLE_DEVICES of each worker to start (None = CPU / inherit): the GPU
        groups of LBS_WORKERS ('0,1;2'), else one GPU per worker, real or simulated."""
        from backend.engine.memory.gpu import visible_gpu_count

        if self.settings.worker_gpu_groups:
            return list(self.settings.worker_gpu_groups)
        visible = self.settings.cuda_visible_devices
        gpus = visible_gpu_count(visible) or len(self.settings.simulated_gpu_memory)
        count = self.settings.workers if self.settings.workers is not None else max(gpus, 1)
        if gpus == 0:
            return [None] * count
        ids = ([e.strip() for e in visible.split(",") if e.strip()] if visible
               else [str(i) for i in range(gpus)])
        return [ids[i % len(ids)] for i in range(count)]

    def _spawn(self, slot: int, device: str | None) -> subprocess.Popen:
        env = self.settings.child_env()
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        # --parent-pid: the worker asks Linux to stop it when this server dies
        # (PR_SET_PDEATHSIG), so a killed server leaves no orphan claiming jobs.
        proc = subprocess.Popen([sys.executable, "-m", "backend.apps.lbs", "worker",
                                 "--parent-pid", str(os.getpid())], env=env, cwd=os.getcwd())
        if self.state is not None:
            self.state.workers_spawned_at = time.monotonic()
        log.info("[Server] worker %d started (pid %d, %s)", slot, proc.pid,
                 f"GPU {device}" if device is not None else "default device")
        return proc

    def start(self) -> None:
        self.devices = self.plan()
        now = time.monotonic()
        for slot, device in enumerate(self.devices):
            self.procs[slot] = self._spawn(slot, device)
            self.started_at[slot] = now
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor",
                                        daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self.stopping.wait(0.5):
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        """One supervision pass at monotonic time `now`: note workers that exited and
        restart those whose delay is over."""
        with self._lock:
            self._check(now)

    def _check(self, now: float) -> None:
        for slot, proc in list(self.procs.items()):
            if self.stopping.is_set():
                return
            if slot in self.restart_at:
                if now >= self.restart_at[slot]:
                    del self.restart_at[slot]
                    self.procs[slot] = self._spawn(slot, self.devices[slot])
                    self.started_at[slot] = now
                continue
            code = proc.poll()
            if code is None:
                continue
            ran = now - self.started_at.get(slot, now)
            failures = 1 if ran >= self.healthy_after else self.failures.get(slot, 0) + 1
            self.failures[slot] = failures
            delay = restart_delay(failures)
            self.restart_at[slot] = now + delay
            log.warning("[Server] worker %d (pid %d) exited with %s after %.0f s; restarting "
                        "in %.0f s", slot, proc.pid, code, ran, delay)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker this pool started (one starting at this moment
        included), wait up to `timeout` seconds for them, then SIGKILL the rest."""
        with self._lock:  # a restart in progress ends first; none starts after
            self.stopping.set()
            procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("[Server] worker pid %d did not stop; killing it", proc.pid)
                proc.kill()


def startup_problem(exc: BaseException, settings: Settings) -> str:
    """One sentence saying why the server cannot start (no traceback)."""
    import errno

    if isinstance(exc, SQLAlchemyError):
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return (f"cannot use the database {mask_url(settings.database_url)}: {reason} "
                "(check the file or server, its permissions, or LBS_DATABASE_URL)")
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {settings.host}:{settings.port}: the port is already "
                "in use (another server running?); stop it or choose another LBS_PORT")
    where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"cannot start: {reason}{where}"


def main(argv: list[str] | None = None, prog: str = "python -m backend.server") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Serve LLM Bench Shower and run its workers.",
                                     epilog="example: lbs serve --port 8080")
    parser.add_argument("--no-workers", action="store_true",
                        help="serve the API only (run `python -m backend.apps.worker` yourself)")
    parser.add_argument("--host", help="address to bind (default: LBS_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: LBS_PORT, 8080)")
    args = parser.parse_args(argv)
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    flags = {"LBS_HOST": args.host, "LBS_PORT": args.port}
    settings = load_settings_or_report({k: v for k, v in flags.items() if v is not None})
    if settings is None:
        return 2
    try:
        check_exposure(settings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    from waitress import create_server

    try:
        app = create_app(settings)
        server = create_server(app, host=settings.host, port=settings.port, threads=8,
                               ident="llm-bench-shower")
    except (OSError, SQLAlchemyError) as exc:
        print(f"error: {startup_problem(exc, settings)}", file=sys.stderr)
        return 2
    pool = WorkerPool(settings, app.extensions["lbs"])
    if not args.no_workers:
        pool.start()

    def _shutdown(*_: Any) -> None:
        log.info("[Server] shutting down")
        server.close()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    log.info("[Server] listening on http://%s:%s (database %s)", settings.host,
             server.effective_port, mask_url(settings.database_url))
    try:
        server.run()
    except (OSError, ValueError):
        pass  # the socket closed under the loop on shutdown
    finally:
        pool.stop()
    return 0


if __name__ == "__main__":
    from backend.common.commands import moved

    moved("python -m backend.server", "lbs serve")
    sys.exit(main())
