"""`python -m backend.apps.mcp_server` driven by the mcp package's own client, over stdio (and
once over streamable HTTP), against a real server + worker that needs an API token."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    ECHO_PLUGIN,
    ROOT,
    SEED_SETTINGS,
    LiveServer,
    free_port,
    stop_process,
)

pytestmark = pytest.mark.slow

TOKEN = "mcp-test-token"
LBS = str(Path(sys.executable).parent / "lbs")
"""The installed command (scripts/setup.sh installs the package into the venv)."""
TOOLS = {"get_gpu_status", "offload_gpu", "release_gpu", "update_gpu_timeout",
         "list_datasets", "search_lm_eval_tasks", "submit_job", "get_job", "cancel_job"}
NIAH = {"context_lengths": [256], "depth_percents": [0, 100], "max_new_tokens": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory, builtin_models_dir):
    """One server + worker for the module, with LBS_API_TOKEN set, the echo plugin, and
    openai: jobs allowed to reach 127.0.0.1:9 (where nothing answers)."""
    root = tmp_path_factory.mktemp("mcp")
    data, plugins = root / "data", root / "plugins"
    data.mkdir()
    plugins.mkdir()
    (data / "models").symlink_to(builtin_models_dir, target_is_directory=True)
    (plugins / "echo_dataset.py").write_text(ECHO_PLUGIN)
    with pytest.MonkeyPatch.context() as mp:  # no setting of the developer's leaks in
        for name in list(os.environ):
            if name.startswith("LBS_") or name in SEED_SETTINGS:
                mp.delenv(name)
        mp.setenv("HF_HUB_OFFLINE", "1")
        live = LiveServer(data, {"LBS_API_TOKEN": TOKEN, "LBS_PLUGIN_DIRS": str(plugins),
                                 "LBS_OPENAI_ALLOWED_HOSTS": "127.0.0.1:9"})
    live.start()
    try:
        live.wait_for_worker()
        yield live
    finally:
        live.stop()


def _env(server: LiveServer, token: str | None) -> dict[str, str]:
    env = {"LBS_ENV_FILE": str(server.data_dir / "no.env"), "LBS_DATA_DIR": str(server.data_dir)}
    if token:
        env["LBS_API_TOKEN"] = token
    return env


@asynccontextmanager
async def session(server: LiveServer, token: str | None = TOKEN):
    from mcp.client import Client
    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(
        command=LBS, args=["mcp", "--server", server.url],  # as the README's client config
        env=_env(server, token), cwd=ROOT)
    async with Client(params) as client:
        yield client


async def call(client, tool: str, **args) -> dict:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def call_error(client, tool: str, **args) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, result.structured_content
    text = result.content[0].text
    assert "Traceback" not in text
    return text


async def wait_job(client, job_id: int, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = await call(client, "get_job", job_id=job_id)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.3)


def test_tools_datasets_and_a_job(server):
    async def scenario():
        async with session(server) as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            listed = await client.call_tool("list_datasets", {})
            names = [d["name"] for d in listed.structured_content["datasets"]]
            assert "needle_in_haystack" in names and "echo" in names
            size = sum(len(c.text) for c in listed.content) + len(
                json.dumps(listed.structured_content))
            assert size < 200_000, f"list_datasets is {size} bytes for an agent's context"
            deadline = time.monotonic() + 300
            while (found := await call(client, "search_lm_eval_tasks", query="arc easy",
                                       limit=3))["status"] == "indexing":
                assert time.monotonic() < deadline, "lm-eval's tasks were never indexed"
                await asyncio.sleep(1)
            assert found["tasks"][0]["name"] == "arc_easy" and len(found["tasks"]) == 3
            assert found["tasks"][0]["data"]["state"] == "missing"
            exact = await call(client, "search_lm_eval_tasks", names=["lbs_example_mc"])
            assert exact["tasks"][0]["data"]["state"] == "ready"

            job = await call(client, "submit_job", model="builtin:tiny",
                             dataset="needle_in_haystack", params=NIAH, priority=5,
                             submitter="mcp-user")
            assert job["state"] == "queued" and job["params"]["context_lengths"] == [256]
            assert (job["priority"], job["submitter"]) == (5, "mcp-user")
            done = await wait_job(client, job["id"])
            assert done["state"] == "succeeded", done["error"]
            assert done["progress"] == {"done": 2, "total": 2}
            assert done == server.request("GET", f"/api/jobs/{job['id']}")[1]["data"]["job"]

    asyncio.run(scenario())


def test_bad_submit_names_the_problem(server):
    async def scenario():
        async with session(server) as client:
            text = await call_error(client, "submit_job", model="builtin:tiny",
                                    dataset="no_such_set")
            assert "HTTP 422 unknown_dataset" in text and "no_such_set" in text
            text = await call_error(client, "submit_job", model="builtin:tiny",
                                    dataset="needle_in_haystack",
                                    params={"context_lengths": [9000]})
            assert "invalid_params" in text and "params.context_lengths" in text
            text = await call_error(client, "get_job", job_id=999999)
            assert "HTTP 404 not_found" in text
            for tool in ("get_job", "cancel_job"):  # not Werkzeug's "requested URL" page
                text = await call_error(client, tool, job_id=-1)
                assert "job_id" in text and "greater than or equal to 1" in text
                assert "URL" not in text and "<" not in text

    asyncio.run(scenario())


def test_submit_job_takes_data_parallel_and_api_like_the_rest_body(server):
    async def scenario():
        async with session(server) as client:
            job = await call(client, "submit_job", model="builtin:tiny",
                             dataset="needle_in_haystack", params=NIAH, data_parallel=2)
            assert job["data_parallel"] == 2
            shards = [server.request("GET", f"/api/jobs/{job['id'] + k}")[1]["data"]["job"]
                      for k in (1, 2)]
            assert [s["data_parallel"] for s in shards] == [2, 2]
            done = await wait_job(client, job["id"])  # one worker here: the shards in turn
            assert done["state"] == "succeeded", done["error"]
            assert done["progress"] == {"done": 2, "total": 2}
            for bad in ("many", 0, 65):
                text = await call_error(client, "submit_job", model="builtin:tiny",
                                        dataset="echo", data_parallel=bad)
                assert "data_parallel" in text and '"auto"' in text, text
                assert "constrained" not in text and "literal" not in text, text

            key = "mcp-job-key-123"
            base = "http://127.0.0.1:9/v1"  # a loopback address, which nothing answers
            job = await call(client, "submit_job", model="openai:tiny",
                             dataset="needle_in_haystack", params=NIAH,
                             api={"base_url": base, "api_key": key, "max_retries": 0})
            assert job["api"]["base_url"] == base and job["api"]["max_retries"] == 0
            assert job["api_key_set"] is True and key not in json.dumps(job)
            await call(client, "cancel_job", job_id=job["id"])
            assert (await wait_job(client, job["id"]))["state"] in ("cancelled", "failed")
            text = await call_error(client, "submit_job", model="openai:tiny",
                                    dataset="needle_in_haystack", api={"base_url": "ftp://x"})
            assert "api.base_url" in text and "http://" in text, text
            text = await call_error(client, "submit_job", model="openai:tiny",  # the server's
                                    dataset="needle_in_haystack")  # check: no URL anywhere
            assert "HTTP 422" in text and "api.base_url" in text, text

    asyncio.run(scenario())


def test_gpu_tools_reach_the_worker(server):
    def api_status() -> dict:
        status, body = server.request("GET", "/api/gpu/status")
        assert status == 200, body
        return body["data"]

    async def scenario():
        async with session(server) as client:
            job = await call(client, "submit_job", model="builtin:tiny", dataset="echo")
            assert (await wait_job(client, job["id"]))["state"] == "succeeded"
            deadline = time.monotonic() + 10
            while "builtin:tiny" not in (status := await call(client, "get_gpu_status"))[
                    "models"]:  # workers publish their status about once a second
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.2)
            assert [w["alive"] for w in status["workers"]] == [True]
            tiny = status["models"]["builtin:tiny"]
            assert tiny["worker_id"] == status["workers"][0]["id"]
            assert tiny["location"] in ("CPU", "GPU") and tiny["idle_timeout_seconds"] == 600

            answer = await call(client, "update_gpu_timeout", timeout_seconds=300)
            assert answer["idle_timeout_seconds"] == 300
            assert api_status()["builtin:tiny"]["idle_timeout_seconds"] == 300
            text = await call_error(client, "update_gpu_timeout", timeout_seconds=-1)
            assert "timeout_seconds" in text and "greater than 0" in text

            answer = await call(client, "offload_gpu")
            assert [w["ok"] for w in answer["workers"]] == [True]
            answer = await call(client, "release_gpu", model="builtin:tiny")
            assert [e["model"] for e in answer["released"]] == ["builtin:tiny"]
            assert api_status() == {}
            text = await call_error(client, "release_gpu", model="builtin:tiny")
            assert "HTTP 404 unknown_model" in text
            text = await call_error(client, "offload_gpu", model="nope")
            assert "HTTP 404 unknown_model" in text and "'nope' is not loaded" in text

    asyncio.run(scenario())


def test_cancel_job_behaves_like_the_api(server):
    async def scenario():
        async with session(server) as client:
            # One worker: the second job waits in the queue while the first runs.
            first = await call(client, "submit_job", model="builtin:tiny",
                               dataset="needle_in_haystack", params=NIAH)
            second = await call(client, "submit_job", model="builtin:tiny",
                                dataset="needle_in_haystack", params=NIAH)
            cancelled = await call(client, "cancel_job", job_id=second["id"])
            assert cancelled["state"] == "cancelled" or cancelled["cancel_requested"]
            assert (await wait_job(client, second["id"]))["state"] == "cancelled"
            assert (await wait_job(client, first["id"]))["state"] == "succeeded"

            text = await call_error(client, "cancel_job", job_id=first["id"])
            status, body = server.request("POST", f"/api/jobs/{first['id']}/cancel")
            assert status == 409 and f"HTTP 409 conflict: {body['error']['message']}" in text

    asyncio.run(scenario())


def test_without_the_token_tools_fail_clearly(server):
    async def scenario():
        async with session(server, token=None) as client:
            text = await call_error(client, "list_datasets")
            assert "HTTP 401 unauthorized" in text and "LBS_API_TOKEN" in text
        async with session(server, token="wrong") as client:
            assert "HTTP 401" in await call_error(client, "get_gpu_status")

    asyncio.run(scenario())


@contextmanager
def http_mcp(server: LiveServer):
    """`python -m backend.apps.mcp_server --http` on a free port, for the server's token."""
    port = free_port()
    proc = subprocess.Popen(
        [LBS, "mcp", "--http", "--port", str(port),
         "--server", server.url], cwd=ROOT, env={**os.environ, **_env(server, TOKEN)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the MCP HTTP server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop_process(proc)


def _post_initialize(url: str, token: str | None) -> tuple[int, Any, str]:
    import urllib.error
    import urllib.request

    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"}}}).encode()
    headers = {"Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, res.headers, res.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def test_streamable_http_needs_the_api_token(server):
    import httpx2
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client

    with http_mcp(server) as url:
        for token in (None, "wrong"):  # anyone on the machine could cancel jobs before
            status, headers, text = _post_initialize(url, token)
            assert status == 401, text
            assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        status, _, text = _post_initialize(url, TOKEN)
        assert status == 200 and '"serverInfo"' in text

        async def scenario():
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                async with Client(streamable_http_client(url, http_client=http)) as client:
                    assert {t.name for t in (await client.list_tools()).tools} == TOOLS
                    datasets = (await call(client, "list_datasets"))["datasets"]
                    assert "needle_in_haystack" in [d["name"] for d in datasets]

        asyncio.run(scenario())


def test_what_a_client_sees_in_the_tool_list(server):
    from backend import __version__

    async def scenario():
        async with session(server) as client:
            assert client.server_info.version == __version__
            tools = {t.name: t for t in (await client.list_tools()).tools}
            for tool in tools.values():
                assert "\n " not in tool.description and "  " not in tool.description
                assert tool.annotations is not None, tool.name
            hints = {name: (t.annotations.read_only_hint, t.annotations.destructive_hint,
                            t.annotations.idempotent_hint) for name, t in tools.items()}
            assert hints["get_gpu_status"][0] and hints["list_datasets"][0]
            assert hints["get_job"][0]
            assert hints["release_gpu"] == (False, True, True)
            assert hints["cancel_job"][:2] == (False, True)
            assert hints["submit_job"] == (False, False, False)
            assert hints["update_gpu_timeout"] == (False, False, True)

            result = await client.call_tool("list_datasets", {})
            text = result.content[0].text
            structured = result.structured_content
            full = json.dumps(structured)
            assert "params_schema" in full and len(text) < len(full) / 2
            assert "needle_in_haystack" in text and "context_lengths" in text

    asyncio.run(scenario())


def test_the_mcp_server_never_imports_torch():
    code = ("import sys, backend.apps.mcp_server as m\n"
            "m.build_server(m.ApiClient('http://127.0.0.1:1'))\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# --- the official MCP Inspector CLI (npm), over stdio and streamable HTTP -------------

INSPECTOR = ROOT / ".node" / "node_modules" / ".bin" / "mcp-inspector"


@pytest.fixture(scope="module")
def inspector() -> str:
    """The Inspector CLI that scripts/test.sh installs into .node/ from npm. Missing, the
    tests skip, except in CI (CI=true), where they fail."""
    if not INSPECTOR.exists():
        give_up = pytest.fail if os.environ.get("CI", "").lower() in ("1", "true") \
            else pytest.skip
        give_up("the MCP Inspector is not installed: bash scripts/test.sh installs it "
                "(npm install --prefix .node @modelcontextprotocol/inspector)")
    return str(INSPECTOR)


def run_inspector(inspector: str, *args: str) -> tuple[int, str]:
    proc = subprocess.run([inspector, "--cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    return proc.returncode, proc.stdout + proc.stderr


def test_inspector_over_stdio(server, inspector):
    env = {**_env(server, TOKEN), "LBS_SERVER_URL": server.url}  # its --server is taken
    stdio = [*[x for k, v in env.items() for x in ("-e", f"{k}={v}")],
             LBS, "mcp"]
    code, out = run_inspector(inspector, *stdio, "--method", "tools/list")
    assert code == 0, out
    tools = {t["name"]: t for t in json.loads(out)["tools"]}
    assert set(tools) == TOOLS
    assert tools["get_job"]["annotations"]["readOnlyHint"] is True
    assert tools["get_job"]["inputSchema"]["properties"]["job_id"]["minimum"] == 1

    schema = tools["submit_job"]["inputSchema"]["properties"]
    assert {"integer", "string"} <= {b.get("type") for b in schema["data_parallel"]["anyOf"]}
    assert "base_url" in json.dumps(tools["submit_job"]["inputSchema"])  # api's fields

    code, out = run_inspector(inspector, *stdio, "--method", "tools/call",
                              "--tool-name", "submit_job", "--tool-arg", "model=builtin:tiny",
                              "--tool-arg", "dataset=echo", "--tool-arg", "data_parallel=2")
    assert code == 0, out
    job = json.loads(out)["structuredContent"]
    assert job["state"] == "queued" and job["data_parallel"] == 2
    assert server.wait_for(job["id"], ("succeeded", "failed"))["state"] == "succeeded"

    code, out = run_inspector(inspector, *stdio, "--method", "tools/call",
                              "--tool-name", "get_job", "--tool-arg", "job_id=-1")
    answer = json.loads(out)
    assert answer["isError"] is True and "job_id" in answer["content"][0]["text"]


def test_inspector_over_http_with_and_without_the_token(server, inspector):
    with http_mcp(server) as url:
        code, out = run_inspector(inspector, url, "--transport", "http",
                                  "--method", "tools/list")
        assert code != 0 and "Authentication required" in out, out
        code, out = run_inspector(inspector, url, "--transport", "http", "--header",
                                  "Authorization: Bearer wrong", "--method", "tools/list")
        assert code != 0 and "invalid_token" in out, out
        code, out = run_inspector(inspector, url, "--transport", "http", "--header",
                                  f"Authorization: Bearer {TOKEN}", "--method", "tools/call",
                                  "--tool-name", "get_gpu_status")
        assert code == 0, out
        status = json.loads(out)["structuredContent"]
        assert [w["alive"] for w in status["workers"]] == [True]
