"""What the static KV cache and torch.compile add to SDPA attention, on this machine.

    .venv/bin/python bench/cache_compile.py [--model builtin:small]
        [--lengths 1024,4096] [--max-new-tokens 32] [--repeats 3] [--no-compile]

The "optimized" inference method uses SDPA attention and a static KV cache sized to
each request; on CUDA transformers also compiles its decode step. This script
measures three variants on the device torch finds (CUDA if present, else CPU), with
plain transformers `generate` (greedy, batch 1), every variant on the same random
prompt of each length:

    sdpa           dynamic cache
    sdpa+static    a StaticCache sized as the runner sizes it (what "optimized" is on the CPU)
    sdpa+compile   the same, plus transformers' decode-step compile (the runner's
                   backend.runners.hf.loading.configure_compile; forced on the CPU too here)

Each variant gets one untimed warm-up generation per length (where compilation
happens), then `--repeats` timed ones; it prints the median end-to-end time, the
decode tokens/s and the ratios against plain sdpa measured in the same run, and
whether the generated tokens equal plain sdpa's.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generate(model, ids, new_tokens: int, extra: dict) -> tuple[float, float, list[int]]:
    """One greedy generation: (total s, decode s after the first logits, new token ids)."""
    import torch

    from backend.runners.hf.generation import FirstTokenClock

    cuda = ids.device.type == "cuda"
    first = FirstTokenClock(cuda)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=0, logits_processor=[first], **extra)
    if cuda:
        torch.cuda.synchronize()
    ended = time.perf_counter()
    return ended - started, ended - first.at, out[0, ids.shape[1]:].tolist()


def _cache(model, length: int, new_tokens: int, static: bool) -> dict:
    """generate's cache argument for one call: a new StaticCache sized as the runner
    sizes it (backend.runners.hf.account.cache_length), or none (a dynamic cache)."""
    from transformers import StaticCache

    from backend.runners.hf.account import cache_length

    if not static:
        return {}
    return {"cache": StaticCache(config=model.config,
                                 max_cache_len=cache_length(length + new_tokens - 1))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("LBS_DATA_DIR", str(Path(tempfile.gettempdir()) / "lbs-bench-data"))

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from backend.common.config import load_settings
    from backend.runners.builtin import ensure_builtin_model
    from backend.runners.hf.loading import configure_compile

    settings = load_settings()
    source = ensure_builtin_model(settings.data_dir, args.model.removeprefix("builtin:"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    lengths = [int(x) for x in args.lengths.split(",")]
    variants = ["sdpa", "sdpa+static"] + ([] if args.no_compile else ["sdpa+compile"])
    vocab = AutoConfig.from_pretrained(source).vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(0, vocab, (1, n), generator=generator) for n in lengths}

    where = torch.cuda.get_device_name(0) if device == "cuda" else \
        (platform.processor() or platform.machine())
    print(f"# {args.model} on {device} ({where}), torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {args.max_new_tokens} new tokens, "
          f"median of {args.repeats}")
    results: dict[tuple[str, int], dict] = {}
    for variant in variants:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        if variant == "sdpa+compile":
            configure_compile(model)
            model.generation_config.compile_config._compile_all_devices = True  # CPU too
        for length in lengths:
            ids = prompts[length].to(device)
            static = variant != "sdpa"

            warm_started = time.perf_counter()
            _generate(model, ids, args.max_new_tokens,
                      _cache(model, length, args.max_new_tokens, static))
            warm = time.perf_counter() - warm_started
            timed = [_generate(model, ids, args.max_new_tokens,
                               _cache(model, length, args.max_new_tokens, static))
                     for _ in range(args.repeats)]
            total = statistics.median(t[0] for t in timed)
            decode = statistics.median(t[1] for t in timed)
            results[(variant, length)] = {
                "total": total, "decode_tps": (args.max_new_tokens - 1) / decode,
                "warm": warm, "tokens": timed[0][2]}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    print("| variant | length | warm-up s | median s | decode tok/s | time vs sdpa "
          "| decode vs sdpa | same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for length in lengths:
        base = results[("sdpa", length)]
        for variant in variants:
            r = results[(variant, length)]
            print(f"| {variant} | {length} | {r['warm']:.2f} | {r['total']:.3f} | "
                  f"{r['decode_tps']:.1f} | {r['total'] / base['total']:.2f}x | "
                  f"{r['decode_tps'] / base['decode_tps']:.2f}x | "
                  f"{'yes' if r['tokens'] == base['tokens'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
