"""Run the project's CLI or lm-evaluation-harness's `lm_eval` command in this process
with timers on its scoring path, for bench/loglikelihood.py --vs-lm-eval:

    python bench/ll_timing.py OUT.json project ARGS...   # = python -m backend.apps.cli ARGS
    python bench/ll_timing.py OUT.json lm_eval ARGS...   # = lm_eval ARGS (its cli_evaluate)

At exit OUT.json holds `scoring_s` (time inside HFRunner.loglikelihood, or lm-eval's
HFLM._loglikelihood_tokens: batching, forward passes, log-softmax, picking), `forward_s`
(time inside the model's forward calls), `forwards` (how many), and the CPU time of
the whole process spent inside them (`scoring_cpu_s`, `forward_cpu_s`: on a machine
shared with other work, CPU seconds say more than wall seconds). The timers add four
clock reads per call; nothing else changes.
"""

from __future__ import annotations

import atexit
import functools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
totals = {"scoring_s": 0.0, "forward_s": 0.0, "forwards": 0, "scoring_cpu_s": 0.0,
          "forward_cpu_s": 0.0}


def timed(fn, key: str, count: str | None = None):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started
            totals[key.replace("_s", "_cpu_s")] += time.process_time() - cpu
            if count:
                totals[count] += 1
    return wrapper


def time_project() -> None:
    from backend.runners.hf.runner import HFRunner

    HFRunner.loglikelihood = timed(HFRunner.loglikelihood, "scoring_s")
    load = HFRunner.load.__func__

    def timed_load(cls, *args, **kwargs):
        runner = load(cls, *args, **kwargs)
        runner.model.forward = timed(runner.model.forward, "forward_s", "forwards")
        return runner
    HFRunner.load = classmethod(timed_load)


def time_lm_eval() -> None:
    from lm_eval.models.huggingface import HFLM

    HFLM._loglikelihood_tokens = timed(HFLM._loglikelihood_tokens, "scoring_s")
    HFLM._model_call = timed(HFLM._model_call, "forward_s", "forwards")


def main() -> int:
    out, which, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    atexit.register(lambda: Path(out).write_text(json.dumps(totals)))
    if which == "project":
        sys.path.insert(0, str(ROOT))
        time_project()
        from backend.apps.cli import main as cli

        return cli(rest)
    time_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *rest]
    return cli_evaluate() or 0


if __name__ == "__main__":
    sys.exit(main())
