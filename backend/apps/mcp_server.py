"""MCP server: LLM Bench Shower's GPU and job tools for MCP clients.

    lbs mcp [--server URL]          # stdio, for a client that spawns it
    lbs mcp --http [--port 8765]    # streamable HTTP on 127.0.0.1/mcp

Tools: get_gpu_status, offload_gpu, release_gpu, update_gpu_timeout,
list_datasets, submit_job, get_job, cancel_job. Each is one or two calls to a
running server's HTTP API (`lbs serve`, at `--server`, default
LBS_SERVER_URL), sending `Authorization: Bearer <LBS_API_TOKEN>` when that is
set. An error answer from the server becomes a tool error carrying its code
and message (e.g. `HTTP 422 unknown_dataset: ...`); so does a server that
does not answer. Arguments are checked before any call (`job_id` >= 1,
`timeout_seconds` > 0), so the error names the tool's own argument.

Over HTTP, with LBS_API_TOKEN set, every request must carry that same token
(`Authorization: Bearer ...`, checked by the SDK's bearer middleware: 401 with
`WWW-Authenticate: Bearer` otherwise): the endpoint would otherwise lend the
token it forwards to anyone on the machine. Over stdio the client that spawned
the process is its only peer.

This process holds no model and never imports torch; it logs to stderr only,
since stdout is the stdio transport. Starting it costs about as much as
importing the `mcp` SDK (bench/mcp_start.py).
"""

from __future__ import annotations

import argparse
import hmac
import inspect
import json
import logging
import sys
from typing import Annotated, Any, Literal

from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field, PlainValidator, WithJsonSchema

from backend import __version__
from backend.apps.client import ApiClient, ServerError
from backend.common.commands import lbs_command
from backend.runners.openai.options import ApiOptions

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "Tools of an LLM Bench Shower server: evaluate language models on benchmark datasets "
    "(list_datasets, submit_job, get_job, cancel_job) and manage the GPU memory its "
    "workers' models hold (get_gpu_status, offload_gpu, release_gpu, update_gpu_timeout).")


JobId = Annotated[int, Field(ge=1, description="the job's id (from submit_job)")]


def _data_parallel(value: Any) -> int | str | None:
    if value is None or value == "auto" or (
            type(value) is int and 1 <= value <= 64):
        return value
    raise ValueError('must be a number of workers from 1 to 64, or "auto"')


DataParallel = Annotated[int | Literal["auto"] | None, PlainValidator(_data_parallel),
                         WithJsonSchema({"anyOf": [
                             {"type": "integer", "minimum": 1, "maximum": 64},
                             {"const": "auto", "type": "string"}, {"type": "null"}],
                             "default": None})]
"""As POST /api/jobs takes it: a number of workers, or "auto"; checked in one step so
that a bad value is one error naming `data_parallel` (a union's members would each
add theirs, named `data_parallel.constrained-int` and `data_parallel.literal['auto']`)."""


def _api_body(api: ApiOptions) -> dict[str, Any]:
    """The `api` object for POST /api/jobs: what the caller set, the key in clear (the
    server encrypts it; it is never logged here)."""
    body = api.model_dump(mode="json", exclude_unset=True, exclude={"api_key"})
    if api.api_key is not None:
        body["api_key"] = api.api_key.get_secret_value()
    return body


def _target(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def describe(fn: Any) -> str:
    """A tool's description from its docstring: indentation gone, each paragraph's
    lines joined into one, as a client shows it."""
    paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def datasets_summary(data: dict[str, Any]) -> str:
    """list_datasets' text for the model to read: each dataset's name, description,
    cache mode and parameter defaults, one per line (the JSON schemas are in the
    structured result only, instead of the whole answer twice)."""
    lines = []
    for ds in data.get("datasets", []):
        props = (ds.get("params_schema") or {}).get("properties") or {}
        defaults = {k: v["default"] for k, v in props.items()
                    if isinstance(v, dict) and "default" in v}
        lines.append(f"{ds['name']} ({ds.get('cache_mode')}): {ds.get('description', '')} "
                     f"Parameters and defaults: {json.dumps(defaults, ensure_ascii=False)}")
    return "\n".join(lines) + ("\n(Each dataset's parameter JSON schema is in the "
                               "structured result.)" if lines else "no datasets")


class SameToken:
    """The SDK's TokenVerifier protocol: a bearer token is good when it is the API's."""

    def __init__(self, token: str):
        self._token = token

    async def verify_token(self, token: str):
        from mcp.server.auth.provider import AccessToken

        if hmac.compare_digest(token.encode(), self._token.encode()):
            return AccessToken(token=token, client_id="lbs-api-token", scopes=[])
        return None


def build_server(api: ApiClient, http_token: str | None = None,
                 http_url: str = "http://127.0.0.1:8765"):
    """The MCPServer with the eight tools, each a thin call through `api`. With
    `http_token` its HTTP app answers 401 to any request without that bearer token."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    auth: dict[str, Any] = {}
    if http_token:
        from mcp.server.auth.settings import AuthSettings

        # issuer_url is required by AuthSettings; no OAuth routes are served (no
        # authorization server provider), only the bearer check.
        auth = {"token_verifier": SameToken(http_token),
                "auth": AuthSettings(issuer_url=http_url, resource_server_url=None)}
    server = MCPServer("llm-bench-shower", instructions=INSTRUCTIONS, version=__version__,
                       **auth)

    def tool(read_only: bool = False, destructive: bool = False, idempotent: bool = False):
        hints = ToolAnnotations(read_only_hint=read_only, destructive_hint=destructive,
                                idempotent_hint=idempotent, open_world_hint=False)

        def register(fn):
            return server.tool(description=describe(fn), annotations=hints)(fn)
        return register

    def call(method: str, path: str, body: Any = None) -> Any:
        try:
            return api.call(method, path, body)
        except ServerError as exc:
            log.info("[MCP] %s %s: %s", method, path, exc)
            text = str(exc)
            if exc.code == "no_server":
                text += f"; start it with `{lbs_command('serve')}` or pass --server"
            raise ToolError(text) from None

    @tool(read_only=True, idempotent=True)
    def get_gpu_status() -> dict[str, Any]:
        """Every model the workers hold (location GPU/CPU, idle time, idle timeout, GPU
        memory, pinned, worker_id) under `models`, and each worker (pid, device, state,
        current job, alive) under `workers`."""
        return {"models": call("GET", "/api/gpu/status"),
                "workers": call("GET", "/api/workers")["workers"]}

    @tool(idempotent=True)
    def offload_gpu(model: str | None = None, worker: str | None = None) -> dict[str, Any]:
        """Move models from GPU to CPU RAM (fast to restore). `model`: one model name,
        all when left out; `worker`: one worker id, all when left out. A worker without
        a GPU keeps its models in RAM and says so."""
        return call("POST", "/api/gpu/offload", _target(model=model, worker=worker))

    @tool(destructive=True, idempotent=True)
    def release_gpu(model: str | None = None, worker: str | None = None) -> dict[str, Any]:
        """Free models completely (GPU and RAM); the answer has the RSS returned.
        `model`: one model name, all when left out; `worker`: one worker id."""
        return call("POST", "/api/gpu/release", _target(model=model, worker=worker))

    @tool(idempotent=True)
    def update_gpu_timeout(timeout_seconds: Annotated[float, Field(gt=0, le=7 * 86400)],
                           worker: str | None = None) -> dict[str, Any]:
        """Set how long a model may sit idle on the GPU before it is offloaded to CPU
        RAM (seconds, > 0, at most 7 days), for every worker or one `worker`."""
        return call("POST", "/api/gpu/timeout",
                    _target(timeout=timeout_seconds, worker=worker))

    @tool(read_only=True, idempotent=True)
    def list_datasets() -> Annotated[CallToolResult, dict[str, Any]]:
        """The datasets a job can name, each with its description, cache mode and the
        defaults of its parameters (the structured result adds each one's JSON
        schema)."""
        data = call("GET", "/api/datasets")
        return CallToolResult(content=[TextContent(type="text", text=datasets_summary(data))],
                              structured_content=data)

    @tool(read_only=True, idempotent=True)
    def search_lm_eval_tasks(
            query: Annotated[str, Field(max_length=200)] = "",
            kind: Literal["task", "py_task", "group", "tag"] | None = None,
            tag: Annotated[str | None, Field(max_length=200)] = None,
            group: Annotated[str | None, Field(max_length=200)] = None,
            names: Annotated[list[str] | None, Field(max_length=500)] = None,
            offset: Annotated[int, Field(ge=0)] = 0,
            limit: Annotated[int, Field(ge=1, le=200)] = 20) -> dict[str, Any]:
        """Search lm-evaluation-harness tasks for the lm_eval dataset (its `tasks`
        parameter): `query` words in the name or hub dataset, or a `kind` (task, group,
        tag), a `tag`, members of a `group`, or exactly these `names`; a page of `limit`
        from `offset`, with `total`. Each task says whether its data is here
        (data.state ready/missing, hub id and config, the command that fetches it); a
        job naming a task whose data is missing is refused while downloads are off.
        `status` is "indexing" for the first ~15 s after the server starts."""
        from urllib.parse import urlencode

        args = {"q": query, "kind": kind, "tag": tag, "group": group, "offset": offset,
                "limit": limit, "names": ",".join(names) if names is not None else None}
        text = urlencode({k: v for k, v in args.items() if v not in (None, "")})
        return call("GET", f"/api/lm_eval/tasks?{text}")

    @tool()
    def submit_job(model: str, dataset: str, params: dict[str, Any] | None = None,
                   timeout_s: float | None = None, priority: int | None = None,
                   submitter: str | None = None, worker_label: str | None = None,
                   num_gpus: int | None = None, data_parallel: DataParallel = None,
                   api: ApiOptions | None = None) -> dict[str, Any]:
        """Queue one evaluation and return the job (id, state "queued", ...).
        `model`: "builtin:tiny", a checkpoint folder, a cached hub id, or
        "openai:<served name>" for a model behind an OpenAI-compatible server; `dataset`:
        a name from list_datasets; `params`: that dataset's parameters (defaults when
        left out; "methods": ["basic", "optimized"] compares inference methods);
        `timeout_s`: fail the job after this many seconds of running; `priority`
        (higher first), `submitter` (submitters take turns), `worker_label` (run only
        on a worker with it) and `num_gpus` as in POST /api/jobs.

        `data_parallel`: spread the job's samples over this many workers (1-64), or
        "auto" for every worker idle now that could run it; still one job, one progress
        and one result. `api`: for an "openai:" model, its server's `base_url` (e.g.
        http://127.0.0.1:8000/v1), `api_key`, `endpoint` (chat or completions) and
        limits; the server's LBS_OPENAI_BASE_URL / LBS_OPENAI_API_KEY fill what is left
        out. The key is stored encrypted and never shown."""
        body = _target(model=model, dataset=dataset, params=params or {}, timeout_s=timeout_s,
                       priority=priority, submitter=submitter, worker_label=worker_label,
                       num_gpus=num_gpus, data_parallel=data_parallel,
                       api=None if api is None else _api_body(api))
        return call("POST", "/api/jobs", body)["job"]

    @tool(read_only=True, idempotent=True)
    def get_job(job_id: JobId) -> dict[str, Any]:
        """One job: state (queued, running, succeeded, failed, cancelled), progress
        {done, total}, scores, memory peaks, error and timings."""
        return call("GET", f"/api/jobs/{job_id}")["job"]

    @tool(destructive=True)
    def cancel_job(job_id: JobId) -> dict[str, Any]:
        """Cancel a queued job at once, or ask a running one to stop after its current
        sample (cancel_requested); a finished job cannot be cancelled (HTTP 409)."""
        return call("POST", f"/api/jobs/{job_id}/cancel")["job"]

    return server


def main(argv: list[str] | None = None, prog: str = "python -m backend.apps.mcp_server") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve LLM Bench Shower's tools over MCP (stdio, or "
                               "streamable HTTP with --http) for a running server.",
        epilog="example: lbs mcp --server http://127.0.0.1:8080")
    parser.add_argument("--server", help="the LLM Bench Shower server's URL "
                                         "(default: LBS_SERVER_URL)")
    parser.add_argument("--http", action="store_true",
                        help="serve streamable HTTP on 127.0.0.1 instead of stdio")
    parser.add_argument("--port", type=int, default=8765,
                        help="port for --http (default 8765)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error("--port must be from 1 to 65535")

    from backend.common.config import load_settings_or_report
    from backend.common.logs import setup_logging

    settings = load_settings_or_report()
    if settings is None:
        return 2
    setup_logging(settings.log_level)  # stderr: stdout belongs to the stdio transport
    api = ApiClient(args.server or settings.server_url, settings.api_token,
                    token_hint="set LBS_API_TOKEN for the MCP server to the server's token")
    url = f"http://127.0.0.1:{args.port}"
    server = build_server(api, settings.api_token if args.http else None, url)
    log.info("[MCP] tools for %s over %s%s", api.base_url, f"{url}/mcp" if args.http else "stdio",
             " (bearer token required)" if args.http and settings.api_token else "")
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.port)
    else:
        server.run("stdio")
    return 0


if __name__ == "__main__":
    from backend.common.commands import moved

    moved("python -m backend.apps.mcp_server", "lbs mcp")
    sys.exit(main())
