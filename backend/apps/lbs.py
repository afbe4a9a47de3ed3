"""`lbs`: the one command of LLM Bench Shower (installed by `pip install
llm-bench-shower`; `python -m backend.apps.lbs` is the same).

    lbs serve [--host H] [--port P] [--no-workers]   the server, the page and its workers
    lbs worker [--gpus 0,1]                          one worker (another machine, a GPU)
    lbs eval --model M --dataset D [--param k=v]     one evaluation in this process
    lbs data fetch|status ...                        datasets' official data
    lbs mcp [--http]                                 the MCP server (stdio or HTTP)
    lbs gpu clear [...]                              what holds GPU memory; release it
    lbs cluster ray|slurm --max-workers N            workers placed on a cluster, scaled
    lbs config [--markdown]                          every setting, with its value here

Each subcommand is the module it names below, run with its own arguments; `lbs <cmd>
--help` says what it does and shows an example.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from backend import __version__


def _serve(argv: list[str]) -> int:
    from backend.server import main

    return main(argv, prog="lbs serve")


def _worker(argv: list[str]) -> int:
    from backend.apps.worker import main

    return main(argv, prog="lbs worker")


def _eval(argv: list[str]) -> int:
    from backend.apps.cli import main

    return main(["eval", *argv], prog="lbs")


def _data(argv: list[str]) -> int:
    from backend.apps.cli import main

    return main(["data", *argv], prog="lbs")


def _mcp(argv: list[str]) -> int:
    from backend.apps.mcp_server import main

    return main(argv, prog="lbs mcp")


def _gpu(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lbs gpu", description="GPU memory: what holds it, and releasing it.",
        epilog="example: lbs gpu clear --dry-run")
    parser.add_argument("action", choices=["clear"],
                        help="clear: show what holds GPU memory, ask the server to release "
                             "(or offload) its models, end stale workers "
                             "(clear_gpu_memory.py)")
    args, rest = parser.parse_known_args(argv[:1])
    import clear_gpu_memory

    return clear_gpu_memory.main(argv[1:], prog=f"lbs gpu {args.action}")


def _cluster(argv: list[str]) -> int:
    from backend.apps.cluster.cli import main

    return main(argv, prog="lbs cluster")


def _config(argv: list[str]) -> int:
    from backend.common.settings_table import main

    return main(argv, prog="lbs config")


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_serve, "serve the web page and the API, with a worker per GPU"),
    "worker": (_worker, "run one worker that takes jobs from the queue"),
    "eval": (_eval, "run one evaluation in this process and print its scores"),
    "data": (_data, "fetch datasets' official data, or show what is ready"),
    "mcp": (_mcp, "serve the tools to MCP clients (stdio, or --http)"),
    "gpu": (_gpu, "show what holds GPU memory and release it (gpu clear)"),
    "cluster": (_cluster, "place workers with Ray or Slurm, scaled with the queue"),
    "config": (_config, "show every setting and its value here (--markdown: the table)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    listing = "\n".join(f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="lbs", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="LLM Bench Shower: evaluate language models on your own GPUs.",
        epilog=f"commands:\n{listing}\n\nexamples:\n  lbs serve --port 8080\n"
               "  lbs eval --model builtin:tiny --dataset needle_in_haystack\n"
               "`lbs <command> --help` says more about each.")
    parser.add_argument("--version", action="version", version=f"lbs {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="command",
                        help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
        return 0
    args = parser.parse_args(argv[:1])
    return COMMANDS[args.command][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
