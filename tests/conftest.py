"""Shared fixtures: a temporary data dir per test, the built-in tiny model made
once per session, apps, clients, and a real server + worker subprocess."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from backend.common.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
SEED_SETTINGS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF",
                 *(s.name for s in SETTINGS if s.seed_name))
"""Variables a test must not inherit besides LBS_*: the allocator's and the brief's names."""


RUN_MARK = "BENCH_SHOWER_TEST_RUN"
"""Set once per test run and inherited by every process a test starts (servers, the
workers they spawn, peers), so processes that outlive the run can be found at its end,
orphans included. Not LBS_*: the data_dir fixture clears those."""
os.environ.setdefault(RUN_MARK, uuid.uuid4().hex)
ROOT_PID = "BENCH_SHOWER_TEST_ROOT"
"""The run's first process (pytest, or pytest-xdist's controller): a marked process
with it among its ancestors still belongs to the run; one without it is an orphan."""
os.environ.setdefault(ROOT_PID, str(os.getpid()))


def _own_helpers() -> set:
    """PIDs of the helpers multiprocessing keeps for this process (its resource
    tracker, its fork server): they end when this process does, so are no leak."""
    import multiprocessing.forkserver as forkserver
    import multiprocessing.resource_tracker as resource_tracker

    pids = {getattr(resource_tracker._resource_tracker, "_pid", None),
            getattr(forkserver._forkserver, "_forkserver_pid", None)}
    return {pid for pid in pids if pid}


def _environ(proc) -> dict:
    import psutil

    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}  # gone, a zombie, or another user's


def _left_running() -> list:
    """This run's processes still alive that this process answers for: its
    descendants (a pytest-xdist worker's subtree excepted: that worker checks its own),
    and orphans (processes with this run's mark whose ancestors no longer include the
    run's first process); this process and its own multiprocessing helpers excepted."""
    import psutil

    me, mark, root = os.getpid(), os.environ[RUN_MARK], int(os.environ[ROOT_PID])
    skip = _own_helpers() | {me}
    found: dict = {}
    todo = psutil.Process(me).children()
    while todo:
        proc = todo.pop()
        if proc.pid in skip or proc.pid in found:
            continue
        mine = os.environ.get("PYTEST_XDIST_WORKER")
        if _environ(proc).get("PYTEST_XDIST_WORKER", mine) != mine:
            continue  # another pytest-xdist worker (seen from the controller)
        found[proc.pid] = proc
        try:
            todo.extend(proc.children())
        except psutil.Error:
            pass
    for proc in psutil.process_iter():
        if proc.pid in skip or proc.pid in found or proc.pid == root:
            continue
        if _environ(proc).get(RUN_MARK) != mark:
            continue
        try:
            if root in {p.pid for p in proc.parents()}:
                continue  # still in the run's tree: its own process answers for it
        except psutil.Error:
            continue
        found[proc.pid] = proc
    alive = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any process it started is still running at its end (a worker
    that outlived its server holds a model's memory on a GPU box), then end them."""
    import psutil

    left = _left_running()
    if left:
        _, left = psutil.wait_procs(left, timeout=10)  # some may be ending right now
    if not left:
        return
    lines = []
    for proc in left:
        try:
            lines.append(f"  pid {proc.pid} (parent {proc.ppid()}): "
                         f"{' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.Error:
            continue
    if not lines:
        return
    message = (f"{len(lines)} process(es) started by the tests were still running "
               "at the end of the run (now killed):\n" + "\n".join(lines))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    if session.exitstatus in (0, 5):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


LONGEST_FILES = (
    "test_lm_eval.py", "test_frontend.py", "test_faults.py", "test_security.py",
    "test_lm_eval_catalog.py", "test_cluster_ray.py", "test_memory_api.py",
    "test_results_page.py", "test_fuzz.py", "test_data_fetch.py", "test_lm_eval_fidelity.py",
    "test_mcp.py", "test_data_parallel.py", "test_clear_gpu_memory.py",
    "test_memory_account.py", "test_prefix_sharing.py", "test_frontend_shards.py",
    "test_datasets_e2e.py", "test_openai_serve.py", "test_jobs.py", "test_compare.py",
    "test_package.py", "test_model_download.py", "test_generation_stop.py",
    "test_cluster_slurm.py", "test_cuda_errors.py", "test_openai_models.py",
    "test_plugin_docs.py", "test_release.py", "test_bounds.py", "test_e2e.py",
)
"""The test files that take longest (each 35 s to 8 minutes of test time on two loaded
cores), longest first. They run first: pytest-xdist hands out files in collection
order, so with the long ones started early the test processes end together instead of
one of them starting a minute-long file when the other is nearly done."""


def pytest_configure(config):
    # pytest-xdist would otherwise reorder files by their number of tests, putting a
    # long file of one or two tests last
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _longest_first(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order


def pytest_collection_modifyitems(config, items):
    _longest_first(items)
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def builtin_models_dir(tmp_path_factory) -> Path:
    """The built-in models, made once for the whole session."""
    from backend.runners.builtin import ensure_builtin_model

    data = tmp_path_factory.mktemp("builtin-data")
    ensure_builtin_model(data, "tiny")
    return data / "models"


@pytest.fixture(autouse=True)
def _registries_restored():
    """A plugin dataset or runner a test registers in this process leaves with the test:
    the registries refuse a second class under a taken name, so another test's plugin of
    the same name (its own copy from its own folder) would be refused here."""
    from backend.datasets import registry as datasets
    from backend.runners import registry as runners

    saved = [(r._registry, dict(r._registry._classes)) for r in (datasets, runners)]
    yield
    for registry, classes in saved:
        registry._classes.clear()
        registry._classes.update(classes)


PROBE = "backend.datasets.lm_eval_probe"
"""The subprocess that lists lm-eval's tasks: a submit-time check or describe() starts one
in the background (lm_eval imports torch: seconds of CPU), and nothing waits for it."""


def end_index_probes(pid: int, recursive: bool = True) -> None:
    """Kill the task-list subprocesses `pid` (and, `recursive`, its descendants) started
    that still run: once their test (or server) is over nobody reads their answer, and
    each would go on using a core the next tests need. A server keeps its list in
    memory, so a probe outlives it unread."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=recursive)
    except psutil.Error:
        return
    for child in children:
        try:
            if PROBE in " ".join(child.cmdline()):
                child.kill()
        except psutil.Error:
            pass


@pytest.fixture(autouse=True)
def _index_probes_ended():
    """A test's in-process checks end with it (a module's server keeps its own)."""
    yield
    end_index_probes(os.getpid(), recursive=False)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One LBS_CACHE_DIR for the whole run, as a user's ~/.cache is shared by all their
    servers and workers: lm-eval's task index is built once per run, not per test.
    pytest-xdist's test processes share it too (the folder above each one's own; an
    index is stored by an atomic rename, so two writing at once is harmless)."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "lbs-cache"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch, shared_cache) -> Path:
    """Every test gets its own data dir; no test reads a user's .env or settings."""
    for name in list(os.environ):
        if name.startswith("LBS_") or name in SEED_SETTINGS:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LBS_ENV_FILE", str(tmp_path / "no.env"))
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("LBS_DATA_DIR", str(data))
    monkeypatch.setenv("LBS_CACHE_DIR", str(shared_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "zoo").mkdir()  # model folders from the API must lie under LBS_MODEL_DIRS
    monkeypatch.setenv("LBS_MODEL_DIRS", str(tmp_path / "zoo"))
    return data


@pytest.fixture
def tasks_dir(tmp_path, monkeypatch) -> Path:
    """The fixture YAMLs with their data files at absolute paths, as LBS_LM_EVAL_INCLUDE_PATH."""
    folder = tmp_path / "lm_eval_tasks"
    shutil.copytree(ROOT / "tests" / "fixtures" / "lm_eval", folder)
    for yaml in folder.glob("*.yaml"):
        text = yaml.read_text()
        for data in ("mc.jsonl", "gen.jsonl", "text.jsonl"):
            text = text.replace(f": {data}", f": {folder / data}")
        yaml.write_text(text)
    monkeypatch.setenv("LBS_LM_EVAL_INCLUDE_PATH", str(folder))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return folder


@pytest.fixture
def with_tiny(data_dir, builtin_models_dir) -> Path:
    """Make the session's built-in tiny model visible in this test's data dir."""
    (data_dir / "models").symlink_to(builtin_models_dir, target_is_directory=True)
    return data_dir


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the whole session. Without PostgreSQL the test skips,
    except in CI (CI=true), where the queue must be tested on both engines: there it
    fails (`bash scripts/test.sh` installs Debian's package when it is missing)."""
    from tests.postgres import PostgresServer, find_bin_dir

    give_up = pytest.fail if os.environ.get("CI", "").lower() in ("1", "true") else pytest.skip
    bin_dir = find_bin_dir()
    if bin_dir is None:
        give_up("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        give_up(f"cannot start PostgreSQL here: {exc}")
    yield server
    server.stop()


ENGINES = ["sqlite", "postgresql"]
"""`@pytest.mark.parametrize("db_url", ENGINES, indirect=True)` runs a test on both."""


@pytest.fixture
def db_url(request, data_dir, monkeypatch) -> str | None:
    """LBS_DATABASE_URL of the test: SQLite in the data dir (None, the default), or a
    fresh database on the session's PostgreSQL when parametrized with "postgresql"."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return None
    url = request.getfixturevalue("postgres").create_database()
    monkeypatch.setenv("LBS_DATABASE_URL", url)
    return url


@pytest.fixture
def settings(data_dir, db_url):
    from backend.common.config import load_settings

    return load_settings()


def queue_on(factory, lease_seconds: float = 60.0, max_attempts: int = 3,
             affinity_seconds: float = 0.0):
    """The queue on `factory`, with the lease settings most tests use."""
    from backend.queue.jobs import Queue

    return Queue(factory, lease_seconds=lease_seconds, max_attempts=max_attempts,
                 affinity_seconds=affinity_seconds)


@pytest.fixture
def factory(settings):
    from backend.queue.db import dispose_engines, session_factory

    yield session_factory(settings.database_url)
    dispose_engines()


@pytest.fixture
def app(settings, with_tiny):
    from backend.server import create_app

    return create_app(settings, {"TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m backend.server` (with its worker) as a subprocess on a free port."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None,
                 cmd: list[str] | None = None, cwd: Path = ROOT):
        self.cmd = cmd or [sys.executable, "-m", "backend.server"]
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir / "server.log"
        self.env = {**os.environ, "LBS_PORT": str(self.port), "LBS_DATA_DIR": str(data_dir),
                    "LBS_WORKERS": "1", "LBS_POLL_INTERVAL": "0.2",
                    "LBS_ENV_FILE": str(data_dir / "no.env"), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> LiveServer:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not answer in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.env.get("LBS_API_TOKEN"):  # the server needs it; send it like a client would
            headers["Authorization"] = f"Bearer {self.env['LBS_API_TOKEN']}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, json.loads(res.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def wait_for(self, job_id: int, states: tuple[str, ...], timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.request("GET", f"/api/jobs/{job_id}")
            assert status == 200, body
            job = body["data"]["job"]
            if job["state"] in states:
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not reach {states}:\n{self.log()[-4000:]}")

    def wait_for_worker(self, timeout: float = 60.0) -> dict:
        """The first worker, once it registered and published its status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = self.request("GET", "/api/workers")[1]["data"]["workers"]
            stats = self.request("GET", "/api/v1/memory/stats")[1]["data"]
            if workers and stats["workers"]:
                return workers[0]
            time.sleep(0.2)
        raise AssertionError(f"no worker came up:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc:
            end_index_probes(self.proc.pid)
            stop_process(self.proc)
        if getattr(self, "_log", None):
            self._log.close()


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM `proc` and wait for it; SIGKILL it if it has not ended after `grace` s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def work_one_job(settings) -> None:
    """Run the next queued job in an in-process worker, started and stopped around it."""
    from backend.apps.worker import Worker

    worker = Worker(settings, worker_id="w")
    worker.start()
    try:
        assert worker.run_once()
    finally:
        worker.stop()
        worker.manager.stop_monitor()


def manager_status(model_name: str, as_of: float, size: int = 1000) -> dict[str, Any]:
    """What a worker publishes (ManagerChannel.publish_status) when its model manager holds one
    small model in RAM, taken at `as_of`: for tests that stand in for a worker."""
    from backend.engine.contracts import CacheMode, HeldModel
    from backend.engine.memory.entries import ManagerConfig
    from backend.engine.memory.manager import ModelManager

    manager = ModelManager(ManagerConfig(max_memory_usage=2**30), has_gpu=False)
    runner = type("Held", (HeldModel,), {"size_bytes": lambda self: size})()
    with manager.use(model_name, model_name, lambda: runner, CacheMode.CACHED):
        pass
    return {**manager.status(), "as_of": as_of}


@pytest.fixture
def live_server(with_tiny):
    server = LiveServer(with_tiny).start()
    yield server
    server.stop()


ECHO_PLUGIN = '''
"""A cached test dataset: the model is asked to repeat a word."""
from pydantic import Field

from backend.datasets.base import CacheMode, Dataset, DatasetParams, Item
from backend.datasets.registry import register


class EchoParams(DatasetParams):
    words: list[str] = Field(default_factory=lambda: ["apple", "river", "stone"])
    max_new_tokens: int = Field(4, ge=1, le=64)


@register
class Echo(Dataset):
    name = "echo"
    description = "Repeat a word back (test plugin)."
    cache_mode = CacheMode.CACHED
    Params = EchoParams

    def build_items(self, params, tokenizer):
        items = []
        for i, word in enumerate(params.words):
            prompt = tokenizer.render(f"Repeat this word: {word}")
            items.append(Item(idx=i, prompt=prompt, prompt_tokens=tokenizer.count_prompt(prompt),
                              max_new_tokens=params.max_new_tokens, reference=word,
                              fields={"word": word}))
        return items

    def score(self, item, prediction):
        return 1.0 if item.reference in prediction.lower() else 0.0
'''


@pytest.fixture
def echo_plugin_dir(tmp_path) -> Path:
    """A LBS_PLUGIN_DIRS folder holding the cached `echo` dataset."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "echo_dataset.py").write_text(ECHO_PLUGIN)
    return folder


@pytest.fixture
def tiny_copy(builtin_models_dir, tmp_path) -> Path:
    """A second model: the tiny model's files in a folder of their own under
    LBS_MODEL_DIRS (used by path)."""
    import shutil

    target = tmp_path / "zoo" / "tiny-copy"
    shutil.copytree(builtin_models_dir / "builtin-tiny-v1", target)
    return target


# --- the browser (Debian's Chromium driven by Playwright) ------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page():
    """A Chromium page; the test fails on any uncaught error in the page."""
    if CHROMIUM is None:
        pytest.fail("Chromium is not installed: scripts/test.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(viewport={"width": 1366, "height": 900})
        page = context.new_page()
        crashes: list[str] = []
        page.on("pageerror", lambda exc: crashes.append(str(exc)))
        yield page
        browser.close()
    assert not crashes, f"uncaught errors in the page: {crashes}"


