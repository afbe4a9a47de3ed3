"""Which GPUs a worker holds: the one it chooses on a machine with several (before
torch initialises CUDA), what NVML (or LBS_SIMULATED_GPU_MEMORY) says about them, and
how the worker names its device."""

from __future__ import annotations

import logging
import socket
from typing import Any

from backend.common.config import Settings, select_cuda_device
from backend.queue.db import session_factory, utcnow
from backend.queue.scheduling import is_alive
from backend.queue.workers import Workers

log = logging.getLogger(__name__)


def choose_gpu(settings: Settings) -> str | None:
    """Without CUDA_VISIBLE_DEVICES on a machine with several GPUs, take the one with
    the most free memory that no live worker on this host holds (every GPU of a
    worker that holds several; workers of other hosts sharing the database hold
    GPUs of their own machines)."""
    from backend.engine.memory.gpu import pick_free_gpu, visible_gpu_count

    if settings.cuda_visible_devices is not None or visible_gpu_count(None) < 2:
        return None
    now, host = utcnow(), socket.gethostname()
    workers = Workers(session_factory(settings.database_url), settings.lease_seconds)
    taken = {str(g["index"]) for w in workers.all()
             if w.host == host and is_alive(w, now, settings.lease_seconds)
             for g in (w.gpus or []) if not g.get("simulated")}
    choice = pick_free_gpu(taken)
    if choice is not None:
        select_cuda_device(choice)
        log.info("[Worker] chose GPU %s (most free memory; taken by others: %s)", choice,
                 ", ".join(sorted(taken)) or "none")
    return choice


def detect_gpus(settings: Settings) -> list[dict[str, Any]]:
    """This worker's GPUs (index, name, total_bytes, free_bytes), read with NVML, limited
    to CUDA_VISIBLE_DEVICES; or the pretend GPUs of LBS_SIMULATED_GPU_MEMORY."""
    from backend.engine.memory.gpu import gpu_inventory

    visible = settings.cuda_visible_devices
    indices = None
    if visible is not None:
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        if all(p.lstrip("-").isdigit() for p in parts):  # not GPU UUIDs
            indices = [int(p) for p in parts if int(p) >= 0]
    if settings.simulated_gpu_memory:
        pretend = [{"index": i, "name": "simulated GPU (LBS_SIMULATED_GPU_MEMORY)",
                    "total_bytes": size, "free_bytes": size, "simulated": True}
                   for i, size in enumerate(settings.simulated_gpu_memory)]
        return [g for g in pretend if indices is None or g["index"] in indices]
    return gpu_inventory(visible)


def describe_device(settings: Settings, gpus: list[dict[str, Any]]) -> str:
    import torch

    if torch.cuda.is_available():
        visible = settings.cuda_visible_devices
        name = torch.cuda.get_device_name(0)
        return f"cuda:{visible or 0} ({name})"
    if gpus and gpus[0].get("simulated"):
        return f"cpu (simulated GPUs {','.join(str(g['index']) for g in gpus)})"
    return "cpu"


def available_bytes(gpus: list[dict[str, Any]], limit_fraction: float,
                    manager: Any) -> tuple[int, ...]:
    """GPU memory a job may use on each of `gpus` now, in CUDA order: its free memory,
    plus on the first GPU what the worker's idle models hold there (the model manager
    makes room by offloading them; a movable model lives on the first GPU); under
    LBS_GPU_MEMORY_LIMIT (`limit_fraction`) never more than the process cap (limit x
    total) less what the worker's models in use hold there, since the cap counts every
    byte the process allocates. Notes each figure as the GPU's `available_bytes`."""
    free = [int(g["free_bytes"]) for g in gpus]
    caps = [int(g["total_bytes"] * limit_fraction) if limit_fraction > 0 else None
            for g in gpus]
    if manager.has_gpu and free:  # lock-free: never waits on a model move
        idle, held = manager.idle_gpu_bytes(), manager.gpu_bytes()
        free[0] += idle
        if caps[0] is not None:
            caps[0] -= held - idle
    free = [f if cap is None else max(0, min(f, cap))
            for f, cap in zip(free, caps, strict=True)]
    for gpu, available in zip(gpus, free, strict=True):
        gpu["available_bytes"] = available
    return tuple(free)
