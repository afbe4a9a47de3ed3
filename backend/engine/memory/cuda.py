"""CUDA readings and releases for the model manager, through torch only when this
process already loaded it: a worker that never ran a local model never imports torch
just to learn there is nothing to free."""

from __future__ import annotations

import sys
from types import ModuleType

from backend.common.units import GiB


def _torch_with_cuda() -> ModuleType | None:
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() else None


def cuda_available() -> bool:
    return _torch_with_cuda() is not None


def gpu_memory() -> dict[str, dict[str, float]]:
    """Per visible GPU: allocated/reserved by this process and total, in GB (2**30 bytes)."""
    torch = _torch_with_cuda()
    if torch is None:
        return {}
    return {f"GPU_{i}": {
        "allocated_gb": round(torch.cuda.memory_allocated(i) / GiB, 3),
        "reserved_gb": round(torch.cuda.memory_reserved(i) / GiB, 3),
        "total_gb": round(torch.cuda.get_device_properties(i).total_memory / GiB, 3),
    } for i in range(torch.cuda.device_count())}


def gpu_cap(fraction: float) -> int:
    """The cap on the models the manager keeps on the GPU: the limit's share of the
    first GPU, where a movable (single-device) model lives and where the loader caps
    it (runners/hf/placement.py); not of every GPU together, which would let models pile up
    on the first GPU beyond its own cap."""
    torch = _torch_with_cuda()
    if fraction <= 0 or torch is None:
        return 0
    return int(fraction * torch.cuda.get_device_properties(0).total_memory)


def free_gpu_bytes() -> int:
    """Free memory of the current GPU as the driver reports it (0 without CUDA)."""
    torch = _torch_with_cuda()
    return torch.cuda.mem_get_info()[0] if torch is not None else 0


def gpu_reserved() -> int:
    """Bytes torch's caching allocator holds on all GPUs (0 without CUDA)."""
    torch = _torch_with_cuda()
    if torch is None:
        return 0
    return sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count()))


def empty_cuda_cache() -> None:
    """Hand the allocators' cached blocks back: the device's, and the pinned host memory's."""
    torch = _torch_with_cuda()
    if torch is not None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:  # the caching allocator for pinned host memory
            host_empty()


def trim_heap() -> None:
    """Ask glibc to hand freed heap pages back to the OS, so RSS really drops."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
