"""GPU memory cap: LBS_GPU_MEMORY_LIMIT -> accelerate `max_memory` and a device map.

With a limit `f` > 0 and CUDA present, each GPU `i` the job uses gets
`max_memory[i] = total_i * f`, and a `cpu` entry of the RAM available now, so
layers that do not fit under the cap spill to RAM instead of failing. A job with
`num_gpus` > 1 gets a map over its first `num_gpus` visible GPUs (whole GPUs when
there is no limit), which shards the model's layers across them. The caller
passes the result to `from_pretrained(..., device_map="auto", max_memory=...)`.
"""

from __future__ import annotations

import logging

import psutil

log = logging.getLogger(__name__)

GiB = 1024**3


def gpu_totals() -> list[int]:
    """Total bytes of each visible CUDA device (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory
            for i in range(torch.cuda.device_count())]


def build_max_memory(fraction: float, totals: list[int] | None = None,
                     cpu_bytes: int | None = None,
                     num_gpus: int | None = None) -> dict[int | str, int] | None:
    """`max_memory` for accelerate, or None when the model goes whole onto one GPU
    (no limit and one GPU used) or there is no GPU.

    `totals` defaults to the visible GPUs' sizes and `cpu_bytes` to the RAM
    available now; both can be given to compute a map for other hardware.
    `num_gpus` (default: one when there is no limit, else all visible) is how many
    of the visible GPUs the model is spread over.
    """
    totals = gpu_totals() if totals is None else totals
    if num_gpus is not None:
        totals = totals[:max(1, num_gpus)]
    elif fraction <= 0:
        totals = totals[:1]
    if not totals or (fraction <= 0 and len(totals) == 1):
        return None
    share = fraction if fraction > 0 else 1.0
    max_memory: dict[int | str, int] = {i: int(total * share) for i, total in enumerate(totals)}
    max_memory["cpu"] = int(psutil.virtual_memory().available if cpu_bytes is None else cpu_bytes)
    what = "GPU memory limit set" if fraction > 0 else f"model sharded over {len(totals)} GPUs"
    log.info("[Runner] %s: %s", what,
             ", ".join(f"cuda:{i} {max_memory[i] / GiB:.2f} GiB of {t / GiB:.2f} GiB "
                       f"({share:.0%})" for i, t in enumerate(totals))
             + f"; cpu {max_memory['cpu'] / GiB:.2f} GiB")
    return max_memory
