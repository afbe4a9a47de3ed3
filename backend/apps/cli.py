"""Command line: run one evaluation in this process, without a server.

    lbs eval --model builtin:tiny --dataset needle_in_haystack \\
        --param 'context_lengths=[256,512]' --param 'depth_percents={"count": 3}' \\
        --output result.json
    lbs data fetch ceval --subsets law     # see backend/apps/data_cli.py

Each --param is key=JSON (a bare word that is not JSON is taken as a string).
`--data-parallel` is refused above 1: this process is one worker, and spreading a
job's samples over several takes a server's workers (POST /api/jobs, MCP submit_job).
The output file holds {"scores", "memory", "samples"} with the same fields as
the API's job and samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from backend.common.config import ConfigError, apply_allocator_settings, load_settings
from backend.common.logs import setup_logging
from backend.engine.contracts import ParamError
from backend.engine.plugins import load_plugins


def parse_param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected key=JSON")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def parse_data_parallel(text: str) -> int | str:
    """`--data-parallel` as the submit body takes it: 1…64 or "auto"."""
    if text == "auto":
        return text
    if text.isdigit() and 1 <= int(text) <= 64:
        return int(text)
    raise argparse.ArgumentTypeError(f'{text!r}: expected a number of workers from 1 to 64, '
                                     'or "auto"')


class _ListSink:
    """SampleSink that keeps results in memory and drives a progress bar."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.bar = None
        self.manifest: dict[str, Any] | None = None

    def stored(self) -> dict:
        return {}

    def set_manifest(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest

    def set_total(self, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:  # a comparison job sets it once per method
            self.bar = tqdm(total=total, unit="sample", file=sys.stderr)

    def write(self, record: Any) -> bool:
        self.records.append(record)
        if self.bar is not None:
            self.bar.set_postfix(score=f"{record.score:.2f}", tokens=record.prompt_tokens)
            self.bar.update(1)
        return True


def _fetch_bar():
    """Progress of a data fetch (LBS_ALLOW_DATA_DOWNLOAD) on stderr: "fetching data"."""
    state: dict[str, Any] = {}

    def report(done: int, total: int | None) -> None:
        from tqdm import tqdm

        if "bar" not in state:
            state["bar"] = tqdm(desc="fetching data", unit="B", unit_scale=True,
                                total=total, file=sys.stderr)
        bar = state["bar"]
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()
    return report


def _spread(stderr: float | None) -> str:
    return f" ± {stderr:.4f}" if stderr is not None else ""


def _print_table(scores: dict[str, Any]) -> None:
    low_high = scores.get("overall_ci95")
    interval = f" [95%: {low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else ""
    print(f"overall score: {scores.get('overall', 0.0):.4f}{_spread(scores.get('overall_stderr'))}"
          f"{interval} over {scores.get('count', 0)} samples"
          + (" (few items: the interval is rough)" if scores.get("few_items") else ""))
    for name, rows in scores.items():
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            continue  # breakdowns are lists of rows; an interval is a list of numbers
        keys = [k for k in rows[0]
                if k not in ("score", "count", "stderr", "ci95", "few_items")]
        print(f"\n{name}:")
        print("  " + "  ".join(f"{k:>16}" for k in keys) + f"  {'score':>8}  {'± stderr':>10}")
        for row in rows:
            stderr = row.get("stderr")
            print("  " + "  ".join(f"{row[k]!s:>16}" for k in keys) + f"  {row['score']:8.4f}"
                  + (f"  {stderr:10.4f}" if stderr is not None else ""))


def cmd_eval(args: argparse.Namespace) -> int:
    from backend.apps.api.schemas import memory_dict, sample_out, scores_dict
    from backend.datasets.registry import UnknownDataset
    from backend.engine.contracts import ModelNotFound
    from backend.engine.evaluation import SampleOutOfMemory, run_evaluation
    from backend.engine.preparation import prepare

    if args.data_parallel not in (None, 1, "auto"):
        print(f"error: --data-parallel {args.data_parallel}: `cli eval` runs the job in "
              "this one process; to spread it over several workers, submit it to a server "
              f"that has them (POST /api/jobs with \"data_parallel\": {args.data_parallel}, "
              "or the MCP tool submit_job)", file=sys.stderr)
        return 2
    settings = load_settings()
    setup_logging("WARNING" if args.quiet else settings.log_level)
    load_plugins(list(settings.plugin_dirs))
    apply_allocator_settings(settings)
    params = dict(args.param or [])
    try:
        job = prepare(args.model, args.dataset, params, settings, confine=False,
                      fetch_data=True, data_progress=_fetch_bar())
    except (UnknownDataset, ModelNotFound, ParamError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        from backend.apps.api.errors import validation_details

        for detail in validation_details(exc, "params"):
            print(f"error: {detail['field']}: {detail['message']}", file=sys.stderr)
        return 2
    from backend.engine.memory.manager import ModelManager

    sink = _ListSink()
    try:
        outcome = run_evaluation(job, ModelManager(use_cache=False), settings, sink)
    except ParamError as exc:  # found only in the model's tokens (e.g. a length too short)
        print(f"error: params.{exc}", file=sys.stderr)
        return 2
    except SampleOutOfMemory as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if sink.bar is not None:
        sink.bar.close()
    result = {
        "model": args.model, "dataset": args.dataset,
        "params": job.params.model_dump(mode="json"),
        "scores": scores_dict(outcome.scores),
        "memory": memory_dict(outcome.memory),
        "manifest": sink.manifest,
        "events": outcome.events,
        "samples": [sample_out(r).model_dump(mode="json") for r in sink.records],
    }
    _print_table(result["scores"])
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False),
                                     encoding="utf-8")
        print(f"\nwrote {args.output}")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m backend.apps.cli") -> int:
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="run one evaluation in this process",
                        description="Run one evaluation in this process and print its "
                                    "scores (no server needed).",
                        epilog=f"example: {prog} eval --model builtin:tiny "
                               "--dataset needle_in_haystack --param context_lengths=[512]")
    ev.add_argument("--model", required=True, help="builtin:tiny, a folder, or a cached hub id")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--param", action="append", type=parse_param, metavar="KEY=JSON")
    ev.add_argument("--output", help="write the result as JSON to this file")
    ev.add_argument("--data-parallel", type=parse_data_parallel, metavar="N|auto",
                    help="workers to spread the job over: this process is one, so 1 or "
                         "auto (= 1) run here and more is refused (submit to a server)")
    ev.add_argument("--quiet", action="store_true", help="log warnings only")
    from backend.apps.data_cli import add_parser, cmd_data

    add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return cmd_data(args) if args.command == "data" else cmd_eval(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from backend.common.commands import moved

    moved("python -m backend.apps.cli", "lbs eval` / `lbs data")
    sys.exit(main())
