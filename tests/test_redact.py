"""Secrets in the forms they really come in: database passwords that SQLAlchemy accepts
with a `/` or as a `password=` query parameter are masked at start-up and in the
start-up error, and a remote error is redacted before it is cut, so no key leaks in
part."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from backend.common.redact import mask_url
from backend.runners.openai.options import ApiOptions
from backend.runners.openai.transport import ApiClient, ApiStats, RemoteApiError
from tests.test_security import _start_fails

SECRET = "pa/ss-SECRET"


def test_passwords_sqlalchemy_accepts_are_masked():
    import sqlalchemy as sa

    slashed = f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/lbs"
    assert sa.make_url(slashed).password == SECRET  # what makes it a password at all
    assert mask_url(slashed) == "postgresql+psycopg://u:***@127.0.0.1:1/lbs"
    query = "postgresql+psycopg://u@127.0.0.1:1/lbs?sslmode=disable&password=SECRET&x=1"
    assert sa.make_url(query).query["password"] == "SECRET"
    assert mask_url(query) == \
        "postgresql+psycopg://u@127.0.0.1:1/lbs?sslmode=disable&password=***&x=1"
    # a URL without a password keeps its path and port
    assert mask_url("see http://host:8000/v1/chat for it") == "see http://host:8000/v1/chat for it"


def test_the_start_up_error_masks_both_forms(tmp_path):
    for url in (f"postgresql+psycopg://lbs:{SECRET}@127.0.0.1:1/lbs",
                "postgresql+psycopg://lbs@127.0.0.1:1/lbs?password=SECRET"):
        out = _start_fails(tmp_path, {"LBS_DATABASE_URL": url, "LBS_PORT": "0"})
        assert "SECRET" not in out and "***" in out, out


def test_a_remote_error_is_redacted_before_it_is_cut():
    key = "sk-" + "k" * 40
    body = json.dumps({"error": {"message": "x" * 280 + f" bad key {key} given"}}).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        options = ApiOptions(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1",
                             max_retries=0)
        client = ApiClient(options, key, ApiStats(), lambda: False)
        with pytest.raises(RemoteApiError) as caught:
            client.post("/chat/completions", {"messages": []})
    finally:
        httpd.shutdown()
        httpd.server_close()
    shown = str(caught.value)
    assert caught.value.status == 401 and "HTTP 401" in shown
    assert "sk-kkkk" not in shown and "kkkkkkkk" not in shown, shown
