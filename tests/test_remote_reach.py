"""With an API token set, jobs reach the port of LBS_OPENAI_BASE_URL, not every port of
its host, so a job cannot probe the machine's other services; what a remote error says
reaches the job as its status and a short message with secrets masked. A real server
and worker; loopback listeners stand in for the model server and a private service."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.conftest import LiveServer

NIAH = {"context_lengths": [256], "depth_percents": [0], "max_new_tokens": 4}
TOKEN = "t0ken"


class JsonError:
    """A JSON service on loopback that answers every POST with `status` and `message`."""

    def __init__(self, status: int, message: str):
        body = json.dumps({"error": {"message": message}}).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_token_server_reaches_only_the_base_urls_port_and_masks_remote_errors(with_tiny):
    model = JsonError(500, "upstream db at postgresql://svc:hunter2@10.0.0.7/m refused; "
                           "password=hunter2 Authorization: Bearer sk-live-abcdef")
    private = JsonError(400, "admin console: password=hunter2")
    listed = JsonError(400, "listed")
    server = LiveServer(with_tiny, {
        "LBS_API_TOKEN": TOKEN, "LBS_OPENAI_BASE_URL": f"http://127.0.0.1:{model.port}/v1",
        "LBS_OPENAI_ALLOWED_HOSTS": f"127.0.0.1:{listed.port}"}).start()
    try:
        def submit(base_url: str) -> tuple[int, dict]:
            return server.request("POST", "/api/jobs", {
                "model": "openai:tiny", "dataset": "needle_in_haystack", "params": NIAH,
                "api": {"base_url": base_url, "max_retries": 0}})

        # other ports of the base URL's host: refused before anything is sent
        for port in (private.port, _closed_port()):
            status, body = submit(f"http://127.0.0.1:{port}/v1")
            assert status == 422, body
            assert [d["field"] for d in body["error"]["details"]] == ["api.base_url"]
        # a host:port the operator listed, and the base URL's own port, are reached
        status, body = submit(f"http://127.0.0.1:{listed.port}/v1")
        assert status == 201, body
        status, body = submit(f"http://127.0.0.1:{model.port}/other")
        assert status == 201, body
        job = server.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"))
        assert job["state"] == "failed" and "HTTP 500" in job["error"], job
        assert "hunter2" not in job["error"] and "sk-live" not in job["error"], job["error"]
    finally:
        server.stop()
        for service in (model, private, listed):
            service.stop()
