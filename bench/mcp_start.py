"""How long an MCP client waits for `python -m backend.apps.mcp_server` to answer `initialize`.

    .venv/bin/python bench/mcp_start.py [--runs 5]

Spawns the stdio server `--runs` times (no LLM Bench Shower server needed: initialize
and tools/list never call it), writes the JSON-RPC `initialize` request at once and
times until its answer arrives, then until `tools/list` answers. The baseline, measured
in the same run, is a bare `python -c pass` start, so the ratio says how much the
server adds to the interpreter's own start on this machine. Prints the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "bench", "version": "0"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
TOOLS = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}


def _line(proc: subprocess.Popen) -> dict:
    while True:
        raw = proc.stdout.readline()
        if not raw:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        message = json.loads(raw)
        if "id" in message:
            return message


def one_run(env: dict[str, str]) -> tuple[float, float]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "backend.apps.mcp_server", "--server",
                             "http://127.0.0.1:1"], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(json.dumps(INITIALIZE) + "\n")
        proc.stdin.flush()
        answer = _line(proc)
        initialized = time.perf_counter() - started
        assert "result" in answer, answer
        proc.stdin.write(json.dumps(INITIALIZED) + "\n" + json.dumps(TOOLS) + "\n")
        proc.stdin.flush()
        tools = _line(proc)
        listed = time.perf_counter() - started
        assert len(tools["result"]["tools"]) == 8, tools
        return initialized, listed
    finally:
        proc.stdin.close()
        proc.wait(30)


def bare_start() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LBS_DATA_DIR": tmp, "LBS_ENV_FILE": str(Path(tmp) / "no.env"),
               "LBS_LOG_LEVEL": "WARNING"}
        bare, init, tools = [], [], []
        for _ in range(args.runs):
            bare.append(bare_start())
            i, t = one_run(env)
            init.append(i)
            tools.append(t)
    b, i, t = (statistics.median(x) for x in (bare, init, tools))
    print(f"runs: {args.runs}")
    print(f"python -c pass        median {b:.3f} s")
    print(f"initialize answered   median {i:.3f} s  ({i / b:.1f}x a bare start)")
    print(f"tools/list answered   median {t:.3f} s  ({t / b:.1f}x a bare start)")


if __name__ == "__main__":
    main()
