"""Prefill work of a NIAH grid with shared prefixes: prompt tokens the transformers
runner computes when each prompt continues from its shared prefix's KV cache, against
the prompts' whole length (what the bare loop computes). A count, not a timing.

    .venv/bin/python bench/prefill_tokens.py [--model builtin:tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:tiny")
    args = parser.parse_args()
    os.environ.setdefault("LBS_DATA_DIR", tempfile.mkdtemp(prefix="lbs-prefill-"))
    os.environ.setdefault("LBS_ENV_FILE", os.devnull)
    from backend.common.config import load_settings
    from backend.datasets.registry import get_dataset
    from backend.engine.contracts import GenerationRequest
    from backend.runners.base import PromptView
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import resolve_model

    settings = load_settings()
    runner = HFRunner.load(resolve_model(args.model, settings),
                           LoadOptions.from_settings(settings), settings)
    for depths in (5, 11):
        ds = get_dataset("needle_in_haystack")
        items = ds.build_items(ds.parse_params({
            "context_lengths": [512, 1024, 2048], "depth_percents": {"count": depths},
            "max_new_tokens": 1}), PromptView(runner))
        got = [runner.generate([GenerationRequest(i.prompt, 1, True, i.prefix)])[0]
               for i in items]
        runner.forget_prefixes()
        total = sum(g.prompt_tokens for g in got)
        computed = sum(g.extra["timing"]["prefill_tokens"] for g in got)
        print(f"3 lengths x {depths} depths: {len(items)} prompts, {total} prompt tokens, "
              f"prefill computed {computed} ({computed / total:.3f}), "
              f"reused {total - computed}")


if __name__ == "__main__":
    main()
