"""A loopback stand-in for the Hugging Face hub, for HF_ENDPOINT: it serves dataset
repositories made of the tests' fixture files, in each dataset's real hub layout.

It implements the routes huggingface_hub (file_download.py, hf_api.py) and datasets'
HfFileSystem call, with the headers they need:

- GET  /api/datasets/{repo}[/revision/{rev}]     repo info with `sha` and `siblings`
- GET  /api/datasets/{repo}/tree/{rev}[/{path}]   entries (type, oid, size, path); recursive
- POST /api/datasets/{repo}/paths-info/{rev}       entries of the given paths
- HEAD/GET /datasets/{repo}/resolve/{rev}/{path}   the file, with X-Repo-Commit, ETag,
  Content-Length, and Range requests (206) as HfFileSystem reads them

Every request is recorded (method, path, bytes sent) so tests can say what went over
the wire; `delay_s` slows each file GET so progress can be watched mid-fetch.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

ROOT = Path(__file__).resolve().parent
FIXTURES = ROOT / "fixtures"


def _parquet(records: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf)
    return buf.getvalue()


def official_repos() -> dict[str, dict[str, bytes]]:
    """The fixture files as the official hub repositories hold them."""
    from backend.datasets.files import read_records

    ceval: dict[str, bytes] = {"README.md": b"---\nlicense: cc-by-nc-sa-4.0\n---\nC-Eval\n"}
    for subject in ("high_school_physics", "law"):
        for split in ("dev", "val"):
            rows = read_records(FIXTURES / "ceval" / split / f"{subject}_{split}.csv")
            rows = [{**r, "id": int(r["id"])} for r in rows]
            ceval[f"{subject}/{split}-00000-of-00001.parquet"] = _parquet(rows)
        ceval[f"{subject}/test-00000-of-00001.parquet"] = _parquet(
            [{**r, "answer": ""} for r in rows])
    gsm8k = {"README.md": b"---\nlicense: mit\n---\nGSM8K\n"}
    for split in ("train", "test"):
        rows = read_records(FIXTURES / "gsm8k" / f"{split}.jsonl")
        gsm8k[f"main/{split}-00000-of-00001.parquet"] = _parquet(rows)
        gsm8k[f"socratic/{split}-00000-of-00001.parquet"] = _parquet(
            [{**r, "question": "SOCRATIC " + r["question"]} for r in rows])
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((FIXTURES / "longbench").glob("*.jsonl")):
            zf.writestr(f"data/{path.name}", path.read_bytes())
    longbench = {"README.md": b"LongBench\n", "data.zip": zbuf.getvalue(),
                 "LongBench.py": b"# the loading script datasets 5 no longer runs\n"}
    longbench_v2 = {"README.md": b"LongBench v2\n",
                    "data.json": (FIXTURES / "longbench_v2" / "data.json").read_bytes()}
    mr = {"README.md": b"MR-GSM8K\n",
          "MR-GSM8K.json": (FIXTURES / "mr_gsm8k" / "MR-GSM8K.json").read_bytes()}
    return {"ceval/ceval-exam": ceval, "openai/gsm8k": gsm8k, "THUDM/LongBench": longbench,
            "THUDM/LongBench-v2": longbench_v2, "Randolphzeng/DiagGSM8K": mr}


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]] | None = None, delay_s: float = 0.0):
        self.repos = repos if repos is not None else official_repos()
        self.delay_s = delay_s
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def commit(self, repo: str) -> str:
        digest = hashlib.sha1(repo.encode())
        for path, data in sorted(self.repos[repo].items()):
            digest.update(path.encode() + hashlib.sha1(data).digest())
        return digest.hexdigest()

    def file_gets(self) -> list[str]:
        with self.lock:
            return [r["path"] for r in self.requests if r["method"] == "GET"
                    and "/resolve/" in r["path"]]

    def bytes_sent(self) -> int:
        with self.lock:
            return sum(r["bytes"] for r in self.requests)

    # --- answers ------------------------------------------------------------------------

    def _entry(self, repo: str, path: str) -> dict[str, Any] | None:
        files = self.repos[repo]
        if path in files:
            data = files[path]
            return {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data),
                    "path": path}
        if any(p.startswith(path.rstrip("/") + "/") for p in files) or path in ("", "/"):
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(),
                    "size": 0, "path": path.strip("/")}
        return None

    def _tree(self, repo: str, path: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        out: dict[str, dict[str, Any]] = {}
        for name in sorted(self.repos[repo]):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            parts = rest.split("/")
            if recursive:
                for i in range(1, len(parts)):
                    d = prefix + "/".join(parts[:i])
                    out.setdefault(d, self._entry(repo, d))
                out[name] = self._entry(repo, name)
            elif len(parts) == 1:
                out[name] = self._entry(repo, name)
            else:
                d = prefix + parts[0]
                out.setdefault(d, self._entry(repo, d))
        return list(out.values())

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def _record(self, sent: int, status: int) -> None:
                with hub.lock:
                    hub.requests.append({"method": self.command, "path": self.path,
                                         "bytes": sent, "status": status})

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                      content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self._record(0 if self.command == "HEAD" else len(body), status)

            def _json(self, value: Any, status: int = 200, headers: dict | None = None) -> None:
                self._send(status, json.dumps(value).encode(), headers)

            def _not_found(self, code: str = "EntryNotFound", message: str = "not found"):
                self._json({"error": message}, 404, {"X-Error-Code": code,
                                                     "X-Error-Message": message})

            def _repo(self, rest: str) -> tuple[str | None, str]:
                for repo in sorted(hub.repos, key=len, reverse=True):
                    if rest == repo or rest.startswith(repo + "/"):
                        return repo, rest[len(repo):].lstrip("/")
                return None, rest

            def _revision_ok(self, repo: str, rev: str) -> bool:
                return rev in ("main", hub.commit(repo))

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_POST(self) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                path = unquote(url.path)
                if not path.startswith("/api/datasets/"):
                    return self._not_found("RepoNotFound", "no such route")
                repo, rest = self._repo(path[len("/api/datasets/"):])
                if repo is None or not rest.startswith("paths-info/"):
                    return self._not_found("RepoNotFound", "repository not found")
                rev = rest[len("paths-info/"):]
                if not self._revision_ok(repo, rev):
                    return self._not_found("RevisionNotFound", "revision not found")
                try:
                    form = json.loads(raw)
                    paths = form.get("paths", [])
                except json.JSONDecodeError:
                    paths = parse_qs(raw).get("paths", [])
                entries = [e for p in paths if (e := hub._entry(repo, p)) is not None]
                self._json(entries)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                path = unquote(url.path)
                query = parse_qs(url.query)
                if path.startswith("/api/datasets/"):
                    repo, rest = self._repo(path[len("/api/datasets/"):])
                    if repo is None:
                        return self._not_found("RepoNotFound", "repository not found")
                    if rest == "" or rest.startswith("revision/"):
                        rev = rest[len("revision/"):] if rest else "main"
                        if not self._revision_ok(repo, rev):
                            return self._not_found("RevisionNotFound", "revision not found")
                        return self._json({
                            "_id": hub.commit(repo)[:24], "id": repo, "author": repo.split("/")[0],
                            "sha": hub.commit(repo), "private": False, "gated": False,
                            "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                            "lastModified": "2024-01-01T00:00:00.000Z",
                            "createdAt": "2024-01-01T00:00:00.000Z",
                            "cardData": {}, "siblings": [{"rfilename": p}
                                                         for p in sorted(hub.repos[repo])]})
                    if rest.startswith("tree/"):
                        rev, _, sub = rest[len("tree/"):].partition("/")
                        if not self._revision_ok(repo, rev):
                            return self._not_found("RevisionNotFound", "revision not found")
                        recursive = query.get("recursive", ["false"])[0].lower() == "true"
                        return self._json(hub._tree(repo, sub, recursive))
                    return self._not_found("EntryNotFound", "no such route")
                if path.startswith("/datasets/") and "/resolve/" in path:
                    repo, rest = self._repo(path[len("/datasets/"):])
                    if repo is None or not rest.startswith("resolve/"):
                        return self._not_found("RepoNotFound", "repository not found")
                    rev, _, name = rest[len("resolve/"):].partition("/")
                    if not self._revision_ok(repo, rev):
                        return self._not_found("RevisionNotFound", "revision not found")
                    data = hub.repos[repo].get(name)
                    if data is None:
                        return self._not_found("EntryNotFound", f"{name} not found")
                    headers = {"X-Repo-Commit": hub.commit(repo),
                               "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                               "Accept-Ranges": "bytes"}
                    if self.command == "GET" and hub.delay_s:
                        time.sleep(hub.delay_s)
                    rng = self.headers.get("Range")
                    if rng and rng.startswith("bytes="):
                        start_s, _, end_s = rng[6:].partition("-")
                        start = int(start_s or 0)
                        end = min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
                        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                        return self._send(206, data[start:end + 1], headers,
                                          "application/octet-stream")
                    return self._send(200, data, headers, "application/octet-stream")
                self._not_found("EntryNotFound", "no such route")

        return Handler
