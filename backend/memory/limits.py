"""GPU memory cap: LBS_GPU_MEMORY_LIMIT -> accelerate `max_memory` and a device map.

With a limit `f` > 0 and CUDA present, each visible GPU `i` gets
`max_memory[i] = total_i * f`, and a `cpu` entry of the RAM available now, so
layers that do not fit under the cap spill to RAM instead of failing. The
caller passes the result to `from_pretrained(..., device_map="auto",
max_memory=...)`.
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
                     cpu_bytes: int | None = None) -> dict[int | str, int] | None:
    """`max_memory` for accelerate, or None when there is no limit or no GPU.

    `totals` defaults to the visible GPUs' sizes and `cpu_bytes` to the RAM
    available now; both can be given to compute a map for other hardware.
    """
    if fraction <= 0:
        return None
    totals = gpu_totals() if totals is None else totals
    if not totals:
        return None
    max_memory: dict[int | str, int] = {i: int(total * fraction) for i, total in enumerate(totals)}
    max_memory["cpu"] = int(psutil.virtual_memory().available if cpu_bytes is None else cpu_bytes)
    log.info("[Runner] GPU memory limit set: %s",
             ", ".join(f"cuda:{i} {max_memory[i] / GiB:.2f} GiB of {t / GiB:.2f} GiB "
                       f"({fraction:.0%})" for i, t in enumerate(totals))
             + f"; cpu {max_memory['cpu'] / GiB:.2f} GiB")
    return max_memory
