"""Stop strings and stop signals inside `generate` (the transformers runner's stopping
criterion): a generation whose stop string appears a few tokens in, against the same
request decoded to its whole budget and cut afterwards (what the runner did before);
and how long a running generation takes to end once its job says stop.

    .venv/bin/python bench/stop_strings.py [--model builtin:tiny] [--budget 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--budget", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("LBS_DATA_DIR", tempfile.mkdtemp(prefix="lbs-stop-"))
    os.environ.setdefault("LBS_ENV_FILE", os.devnull)
    from backend.common.config import load_settings
    from backend.engine.contracts import GenerationRequest, Stopped, cut_at_stop
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import resolve_model

    settings = load_settings()
    runner = HFRunner.load(resolve_model(args.model, settings),
                           LoadOptions.from_settings(settings), settings)
    prompt = "The quick brown fox"
    started = time.perf_counter()
    # the baseline: the whole budget decoded (no stop string can appear), cut after
    (whole,) = runner.generate([GenerationRequest(prompt, args.budget, chat_template=False,
                                                  stop=("\x00",))])
    whole_s = time.perf_counter() - started
    stop = runner.decode(runner.encode(whole.text)[4:6])
    started = time.perf_counter()
    (early,) = runner.generate([GenerationRequest(prompt, args.budget, chat_template=False,
                                                  stop=(stop,))])
    early_s = time.perf_counter() - started
    assert early.text == cut_at_stop(whole.text, (stop,))
    print(f"stop string {stop!r}: whole budget {whole.output_tokens} tokens {whole_s:.2f} s, "
          f"stopped at it {early.output_tokens} tokens {early_s:.2f} s "
          f"({whole_s / early_s:.1f}x faster, same reply)")

    signalled: list[float] = []

    def should_stop() -> bool:
        if not signalled and time.perf_counter() - started > 1.0:
            signalled.append(time.perf_counter())
        return bool(signalled)

    runner.should_stop = should_stop
    started = time.perf_counter()
    try:
        runner.generate([GenerationRequest(prompt, args.budget, chat_template=False)])
        print("the generation was not stopped")
    except Stopped:
        after_ms = (time.perf_counter() - signalled[0]) * 1000
        print(f"stop signalled 1.0 s into a {args.budget}-token generation "
              f"(~{whole_s:.1f} s whole): ended {after_ms:.1f} ms after the signal")


if __name__ == "__main__":
    main()
