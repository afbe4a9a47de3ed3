"""What the transformers runner holds beyond its weights against what its memory account
(runners/hf/account.work_bytes) says, on every code path, on the CPU.

For each path one batch runs under the census of live tensor storage
(tests/memory_census.py, the weights excluded); the table gives the census peak, the
account of the batch's plan and their ratio (admission is right when the ratio is at
least 1.00; it should stay under 1.30). The built-in tiny model, float32, no download.

    .venv/bin/python bench/memory_account.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as data:
        os.environ["LBS_DATA_DIR"] = data
        from backend.common.config import load_settings
        from backend.engine.contracts import GenerationRequest, LoglikelihoodRequest
        from backend.runners.builtin import ensure_builtin_model
        from tests.test_memory_account import _load, _measure, _text

        settings = load_settings()
        ensure_builtin_model(Path(data), "tiny")
        runs = []
        tiny = _load(settings)
        head = _text(tiny, 1500, 1)
        prefixes = [head + _text(tiny, 40 * (i + 1), 10 + i) for i in range(3)]
        context = _text(tiny, 600, 5)
        runs += [
            ("plain generate, 1 row of 1500", tiny, "generate",
             [GenerationRequest(_text(tiny, 1500, 1), 16, False)], 1),
            ("padded batch, 4 rows of 700-1200", tiny, "generate",
             [GenerationRequest(_text(tiny, n, n), 12, False) for n in (1200, 1000, 800, 700)],
             1),
            ("shared prefix, 3 rows of ~1900", tiny, "generate",
             [GenerationRequest(p + _text(tiny, 300, 20), 8, False, prefix=p)
              for p in prefixes], 1),
            ("log-likelihood, 4 questions x 4 letters", tiny, "loglikelihood",
             [LoglikelihoodRequest(_text(tiny, 400, 30 + q), f" {c}")
              for q in range(4) for c in "ABCD"], 4),
            ("log-likelihood, shared context x 3 continuations", tiny, "loglikelihood",
             [LoglikelihoodRequest(context, " " + _text(tiny, 12, 40 + i)) for i in range(3)], 4),
            ("rolling, one text of 3000", tiny, "rolling", [_text(tiny, 3000, 50)], 1),
        ]
        basic, optimized = _load(settings, "basic"), _load(settings, "optimized")
        runs += [
            ("basic method (eager), 2 rows", basic, "generate",
             [GenerationRequest(_text(basic, n, n), 8, False) for n in (900, 700)], 1),
            ("optimized method (static cache), 1 row", optimized, "generate",
             [GenerationRequest(_text(optimized, 900, 60), 8, False)], 1),
        ]
        print(f"{'path':<50} {'census MiB':>11} {'account MiB':>12} {'ratio':>6}")
        for name, runner, kind, requests, batch in runs:
            runner.forget_prefixes()
            _, peak, account, _ = _measure(runner, kind, requests, batch)
            print(f"{name:<50} {peak / 2**20:11.2f} {account / 2**20:12.2f} "
                  f"{account / peak:6.2f}")


if __name__ == "__main__":
    main()
