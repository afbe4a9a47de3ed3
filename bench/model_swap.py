"""Model manager costs: cold load vs raw disk read, warm reuse, RSS at load and after
release, and (on a GPU) offload/restore against pinned host<->device bandwidth.

    .venv/bin/python bench/model_swap.py [--model builtin:small] [--repeats 3]

Every measurement runs in a fresh process so RSS starts clean, and the weights'
files are dropped from the page cache first (posix_fadvise DONTNEED), so "cold"
means read from disk. Figures, each against a baseline from the same run:
  cold load / raw read   from_pretrained + first touch of every weight through the
                         manager, against reading the same safetensors bytes
  warm reuse             a cached model handed out again by the manager
  peak RSS / weights     RSS high-water mark above the start, during load+touch
                         (target <= 1.2)
  RSS returned           by the manager's release, share of the weights (target >= 0.9)
  restore / bandwidth    GPU only: CPU->GPU restore against a pinned copy of the same
                         bytes (target >= 0.7 of the bandwidth)
By default it also builds a ~350 MB Llama-style model locally (`--no-medium` skips it).
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
MB = 2**20


def drop_cache(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def touch(model) -> None:
    """Read every weight once, as a first forward pass would: the weights are mapped
    from the safetensors file and only paged in when read. (A function, so no
    loop variable outlives it: one leftover tensor keeps the whole file mapping.)"""
    import torch

    with torch.inference_mode():
        for param in model.parameters():
            param.float().sum().item()


def measure(model: str) -> dict:
    """One fresh-process measurement (called through --measure)."""
    sys.path.insert(0, str(ROOT))
    from backend.apps.worker_process import warm_up

    warm_up()
    import torch

    from backend.common.config import load_settings
    from backend.engine.contracts import CacheMode
    from backend.engine.memory.entries import ManagerConfig
    from backend.engine.memory.manager import ModelManager
    from backend.engine.memory.tracker import PeakSampler, rss_bytes
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import resolve_model

    settings = load_settings()
    spec = resolve_model(model, settings)
    folder = spec.path
    files = sorted(folder.glob("*.safetensors"))
    weights = sum(f.stat().st_size for f in files)
    out = {"weights_bytes": weights}

    drop_cache(folder)
    started = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 * MB):
                pass
    out["raw_read_s"] = time.perf_counter() - started

    drop_cache(folder)
    manager = ModelManager(ManagerConfig.from_settings(settings))
    key = ("bench", model)
    load = lambda: HFRunner.load(spec, LoadOptions.from_settings(settings), settings)  # noqa: E731
    base = rss_bytes()
    sampler = PeakSampler().start()
    started = time.perf_counter()
    with manager.use(key, model, load, CacheMode.CACHED) as runner:
        out["from_pretrained_s"] = time.perf_counter() - started
        touch(runner.model)
        out["cold_load_s"] = time.perf_counter() - started
    out["peak_rss_delta_bytes"] = sampler.stop() - base
    started = time.perf_counter()
    with manager.use(key, model, load, CacheMode.CACHED):
        out["warm_reuse_s"] = time.perf_counter() - started
    out["load_count"] = manager.load_counts[key]

    if torch.cuda.is_available():
        entry_runner = runner
        size = entry_runner.size_bytes()
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(size, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        started = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        out["h2d_bandwidth_gbs"] = size / (time.perf_counter() - started) / 2**30
        del host, dev
        offloads, restores = [], []
        for _ in range(3):
            event = manager.offload(model)[0]
            offloads.append(event["seconds"])
            with manager.use(key, model, load, CacheMode.CACHED):
                restores.append(manager.events[-1].seconds)
        manager.offload(model)
        out["first_offload_s"], out["offload_s"] = offloads[0], statistics.median(offloads[1:])
        out["restore_s"] = statistics.median(restores)
        out["restore_gbs"] = size / out["restore_s"] / 2**30

    before = rss_bytes()
    event = manager.release(model)[0]
    out["release_s"] = event["seconds"]
    out["rss_returned_bytes"] = before - rss_bytes()
    return out


def make_medium(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from backend.runners.builtin import build_tokenizer

    tok = build_tokenizer(2048)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-medium", action="store_true")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return

    work = Path(tempfile.mkdtemp(prefix="lbs-swap-"))
    env = {**os.environ, "LBS_DATA_DIR": str(work / "data"), "LBS_ENV_FILE": str(work / "x"),
           "LBS_LOG_LEVEL": "WARNING"}
    os.environ.update({k: env[k] for k in ("LBS_DATA_DIR", "LBS_ENV_FILE")})
    sys.path.insert(0, str(ROOT))
    from backend.common.config import load_settings
    from backend.runners.builtin import ensure_builtin_model

    models = [args.model]
    if args.model.startswith("builtin:"):
        ensure_builtin_model(load_settings().data_dir, args.model.split(":", 1)[1])
    if not args.no_medium:
        models.append(str(make_medium(work / "medium")))
    for model in models:
        runs = []
        for _ in range(args.repeats):
            proc = subprocess.run([sys.executable, __file__, "--measure", model], env=env,
                                  capture_output=True, text=True, check=True, cwd=ROOT)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        w = med["weights_bytes"]
        print(f"\n{model if len(model) < 40 else 'medium (local Llama, 12 layers)'}: "
              f"weights {w / MB:.1f} MB, {args.repeats} fresh processes, medians")
        print(f"  raw read {med['raw_read_s']:.3f} s ({w / MB / med['raw_read_s']:.0f} MB/s); "
              f"from_pretrained {med['from_pretrained_s']:.3f} s; load + first touch "
              f"{med['cold_load_s']:.3f} s -> cold load / raw read "
              f"{med['cold_load_s'] / med['raw_read_s']:.2f}")
        print(f"  warm reuse {med['warm_reuse_s'] * 1e6:.0f} us (load count stays "
              f"{int(med['load_count'])})")
        print(f"  peak RSS during load {med['peak_rss_delta_bytes'] / MB:.1f} MB -> "
              f"{med['peak_rss_delta_bytes'] / w:.2f} x weights (target <= 1.2)")
        print(f"  release {med['release_s'] * 1000:.0f} ms returned "
              f"{med['rss_returned_bytes'] / MB:.1f} MB -> {med['rss_returned_bytes'] / w:.2f}"
              " of weights (target >= 0.9)")
        if "restore_s" in med:
            print(f"  GPU: pinned H2D {med['h2d_bandwidth_gbs']:.1f} GB/s; restore "
                  f"{med['restore_s'] * 1000:.1f} ms = {med['restore_gbs']:.1f} GB/s -> "
                  f"{med['restore_gbs'] / med['h2d_bandwidth_gbs']:.2f} of bandwidth "
                  f"(target >= 0.7); offload first {med['first_offload_s'] * 1000:.1f} ms, "
                  f"then {med['offload_s'] * 1000:.2f} ms (GPU copy dropped)")
        else:
            print("  GPU: none here; offload/restore not measured")


if __name__ == "__main__":
    main()
