"""Who may do what: the API token, loopback-only without one, CORS."""

from __future__ import annotations

import subprocess
import sys

from backend.common.config import load_settings
from backend.server import create_app
from tests.conftest import ROOT

TOKEN = "s3cret-token"


def _client(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return create_app(load_settings(), {"TESTING": True}).test_client()


def test_token_required_except_health_and_page(monkeypatch, with_tiny):
    client = _client(monkeypatch, LBS_API_TOKEN=TOKEN)
    assert client.get("/healthz").status_code == 200
    assert client.get("/").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    for path in ("/api/jobs", "/api/datasets", "/api/v1/memory/stats", "/openapi.json"):
        res = client.get(path)
        assert res.status_code == 401, path
        assert res.get_json()["error"]["code"] == "unauthorized"
        assert TOKEN not in res.get_data(as_text=True)
    assert client.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


def test_no_token_configured_means_open_on_loopback(monkeypatch, with_tiny):
    assert _client(monkeypatch).get("/api/jobs").status_code == 200


def test_cors_only_for_listed_origins(monkeypatch, with_tiny):
    client = _client(monkeypatch, LBS_CORS_ORIGINS="http://lab.example:3000")
    allowed = client.get("/api/jobs", headers={"Origin": "http://lab.example:3000"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://lab.example:3000"
    other = client.get("/api/jobs", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    default = _client(monkeypatch, LBS_CORS_ORIGINS="")
    assert "Access-Control-Allow-Origin" not in default.get(
        "/api/jobs", headers={"Origin": "http://lab.example:3000"}).headers


def test_refuses_non_loopback_without_token(monkeypatch):
    monkeypatch.setenv("LBS_HOST", "0.0.0.0")
    proc = subprocess.run([sys.executable, "-m", "backend.server", "--no-workers"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "LBS_HOST='0.0.0.0' is reachable from other machines" in proc.stderr
    assert "LBS_API_TOKEN" in proc.stderr and "Traceback" not in proc.stderr
