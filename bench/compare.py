"""Basic vs optimized inference: one comparison job (`params.methods`) over a NIAH grid,
run in this process the way the worker runs it, and the ratios optimized/basic.

    .venv/bin/python bench/compare.py [--model builtin:small]
        [--context-lengths 1024,2048,4096] [--depths 0,50,100] [--batch-size 1]
        [--max-new-tokens 32] [--methods basic,optimized] [--json]

basic is transformers with eager attention and a dynamic cache; optimized is SDPA
attention and a static KV cache, plus torch.compile when the model is on CUDA. Both
answer the same prompts, one after the other, the first model released before the
second loads; each pass starts with an untimed warm-up generation. Per method it
prints prefill and decode tokens/s (from the runner's own prefill/decode split), mean
latency per sample, end-to-end samples/s (sum of per-sample latencies), load and
warm-up time, peak RSS (absolute, and above the RSS before the first load), peak GPU
memory on CUDA, and the score; then optimized/basic for throughput and peak memory,
and the agreement (share of prompts both answered alike).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20


class _Sink:
    """Keeps the records in memory (a SampleSink, as the CLI's)."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def stored(self) -> dict:
        return {}

    def set_total(self, total: int) -> None:
        pass

    def set_manifest(self, manifest: dict) -> None:
        pass

    def write(self, record: Any) -> bool:
        self.records.append(record)
        return True


class _WarmUps(logging.Handler):
    """Catches evaluation's "<method> warm-up took <s>" lines: on CUDA the optimized
    warm-up is where torch.compile runs, a cost the timed pass no longer shows."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if (isinstance(record.msg, str) and "warm-up took" in record.msg
                and len(record.args or ()) == 2):
            method, seconds = record.args
            self.seconds[method] = float(seconds)


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_average": [round(x, 2) for x in os.getloadavg()],
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    import transformers

    out["transformers"] = transformers.__version__
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One comparison job through backend.engine.evaluation; the figures as a dict."""
    from backend.apps.worker_process import warm_up

    warm_up()  # as a worker does at start, so neither method pays the lazy imports
    from backend.apps.api.schemas import memory_dict, scores_dict
    from backend.common.config import apply_allocator_settings, load_settings
    from backend.engine.evaluation import run_evaluation
    from backend.engine.memory.entries import ManagerConfig
    from backend.engine.memory.manager import ModelManager
    from backend.engine.preparation import prepare

    settings = load_settings()
    apply_allocator_settings(settings)
    params = {"context_lengths": args.context_lengths, "depth_percents": args.depths,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "methods": args.methods}
    job = prepare(args.model, "needle_in_haystack", params, settings, confine=False)
    warmups = _WarmUps()
    evaluation_log = logging.getLogger("backend.engine.evaluation")
    evaluation_log.setLevel(logging.INFO)
    evaluation_log.addHandler(warmups)
    sink = _Sink()
    info = machine()
    outcome = run_evaluation(job, ModelManager(ManagerConfig.from_settings(settings)),
                             settings, sink)
    scores, memory = scores_dict(outcome.scores), memory_dict(outcome.memory)
    loads = [e for e in outcome.events if e["kind"] == "load"]
    releases = [e for e in outcome.events if e["kind"] == "release"]
    start_mb = memory["rss_before_load_mb"]
    methods: dict[str, dict[str, Any]] = {}
    for k, row in enumerate(scores["methods"]):
        name = row["method"]
        mine = [r for r in sink.records if r.fields.get("method") == name]
        busy = sum(r.latency_s for r in mine)
        methods[name] = {
            **{key: row[key] for key in ("prefill_tokens_per_s", "decode_tokens_per_s",
                                         "latency_s_mean", "peak_rss_mb", "peak_gpu_mb")},
            "score": round(row["score"], 4), "count": row["count"],
            "samples_per_s": round(len(mine) / busy, 3) if busy else None,
            "peak_rss_above_start_mb": round(row["peak_rss_mb"] - start_mb, 1),
            "load_s": loads[k]["seconds"] if k < len(loads) else None,
            "warm_up_s": round(warmups.seconds[name], 3) if name in warmups.seconds else None,
            "release_note": releases[k].get("note") if k < len(releases) else None,
        }
    return {"command": "bench/compare.py " + " ".join(sys.argv[1:]), "machine": info,
            "model": args.model, "params": job.params.model_dump(mode="json"),
            "prompt_tokens": sorted({r.prompt_tokens for r in sink.records}),
            "methods": methods, "agreement": scores.get("agreement"),
            "ratios": ratios(methods), "rss_before_load_mb": start_mb,
            "events": [e["kind"] for e in outcome.events]}


def ratios(methods: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """optimized / basic for each figure both methods have (None where one lacks it)."""
    if not {"basic", "optimized"} <= set(methods):
        return {}
    fast, base = methods["optimized"], methods["basic"]
    out = {}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "samples_per_s",
                "peak_rss_mb", "peak_rss_above_start_mb", "peak_gpu_mb"):
        a, b = fast.get(key), base.get(key)
        out[key] = round(a / b, 3) if a and b else None
    return out


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
          f"GPU: {m['gpu'] or 'none (optimized = SDPA + static cache; no compile)'}; "
          f"torch {m['torch']}, transformers {m['transformers']}; "
          f"load average at start {m['load_average']}")
    params = result["params"]
    print(f"model {result['model']}: {len(params['context_lengths'])} lengths "
          f"{params['context_lengths']} x {len(params['depth_percents'])} depths, "
          f"prompts of {min(result['prompt_tokens'])}-{max(result['prompt_tokens'])} tokens, "
          f"{params['max_new_tokens']} new tokens, batch size {params['batch_size']}; "
          f"events {' -> '.join(result['events'])}")
    print(f"\n{'method':>10} {'prefill tok/s':>14} {'decode tok/s':>13} {'latency s':>10} "
          f"{'samples/s':>10} {'load s':>7} {'warm-up s':>10} {'peak RSS MB':>12} "
          f"{'(above start)':>14} {'peak GPU MB':>12} {'score':>6}")
    for name, row in result["methods"].items():
        print(f"{name:>10} {_fmt(row['prefill_tokens_per_s']):>14} "
              f"{_fmt(row['decode_tokens_per_s']):>13} {_fmt(row['latency_s_mean'], '', 3):>10} "
              f"{_fmt(row['samples_per_s'], '', 3):>10} {_fmt(row['load_s'], '', 2):>7} "
              f"{_fmt(row['warm_up_s'], '', 2):>10} {_fmt(row['peak_rss_mb']):>12} "
              f"{_fmt(row['peak_rss_above_start_mb']):>14} {_fmt(row['peak_gpu_mb']):>12} "
              f"{row['score']:>6.3f}")
    r = result["ratios"]
    if r:
        print("\noptimized / basic: prefill tok/s {}, decode tok/s {}, samples/s {}, "
              "peak RSS {} (above start {}), peak GPU {}".format(
                  *(_fmt(r[k], "x", 2) for k in ("prefill_tokens_per_s", "decode_tokens_per_s",
                                                  "samples_per_s", "peak_rss_mb",
                                                  "peak_rss_above_start_mb", "peak_gpu_mb"))))
    print(f"agreement: {_fmt(result['agreement'], '', 3)} (share of prompts both methods "
          "answered alike)")
    for name, row in result["methods"].items():
        print(f"release after {name}: {row['release_note']}")


def _numbers(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}")
    return parse


def main() -> None:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--context-lengths", type=_numbers(int), default=[1024, 2048, 4096])
    parser.add_argument("--depths", type=_numbers(float), default=[0, 50, 100])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["basic", "optimized"],
                        help="the order the passes run in (default basic,optimized)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if "LBS_DATA_DIR" not in os.environ:  # built-in models made in a scratch folder
        work = Path(tempfile.mkdtemp(prefix="lbs-compare-"))
        os.environ.update(LBS_DATA_DIR=str(work / "data"), LBS_ENV_FILE=str(work / "x"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # evaluation's INFO is for _WarmUps only
        handler.setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from pydantic import ValidationError

    from backend.engine.contracts import ModelNotFound, ParamError

    try:
        result = run(args)
    except (ParamError, ModelNotFound, ValidationError) as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
