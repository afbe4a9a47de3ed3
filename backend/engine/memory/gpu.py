"""NVML helpers: GPU facts read without torch (the server uses them)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def visible_gpu_count(cuda_visible_devices: str | None) -> int:
    """How many GPUs this machine shows to CUDA programs (0 without NVML or a driver).

    `cuda_visible_devices` is the CUDA_VISIBLE_DEVICES value in force, if any.
    """
    if cuda_visible_devices is not None:
        entries = [e for e in cuda_visible_devices.split(",") if e.strip() and e.strip() != "-1"]
        if not entries:
            return 0
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return 0
    if cuda_visible_devices is not None:
        return min(count, len(entries))
    return count


def process_gpu_bytes(pid: int) -> int | None:
    """GPU memory NVML sees `pid` using on all devices (non-torch allocations and the
    CUDA context included), or None when NVML cannot say: no NVML or driver, `pid`
    not among the processes the driver lists (inside a container's PID namespace it
    lists host PIDs, so nothing matches os.getpid()), or listed without a figure
    (pynvml gives usedGpuMemory None where the driver does not report it)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError or NVMLError: nothing to read
        return None
    try:
        total, found = 0, False
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid:
                    if proc.usedGpuMemory is None:
                        return None
                    total, found = total + proc.usedGpuMemory, True
        return total if found else None
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


_baseline: dict[int, int] = {}
"""Used bytes per NVML index (or per position in CUDA_VISIBLE_DEVICES, see
`_baseline_visible`) when the worker started (see take_device_baseline)."""
_baseline_visible: list[str | None] = [None]


def _device_used(indices: list[int] | None, visible: str | None = None) -> dict[int, int] | None:
    """Used bytes of the GPUs with these NVML indices (all when None), or with
    `visible` of the devices CUDA_VISIBLE_DEVICES names, by position (a MIG slice's
    own use)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError or NVMLError: nothing to read
        return None
    try:
        if visible is not None:
            return {k: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
                    for k, (_, handle) in enumerate(_visible_devices(pynvml, visible))}
        count = pynvml.nvmlDeviceGetCount()
        return {i: int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used)
                for i in (range(count) if indices is None else indices) if i < count}
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def take_device_baseline(indices: list[int] | None, visible: str | None = None) -> None:
    """Note the memory used on these GPUs (NVML indices; all when None), or on the
    devices CUDA_VISIBLE_DEVICES = `visible` names (a MIG slice by itself), now, before
    this worker loads anything: the fallback reading when NVML cannot tell this
    process's own use (see `device_used_since_baseline`)."""
    _baseline.clear()
    _baseline_visible[0] = visible
    _baseline.update(_device_used(indices, visible) or {})


def device_used_since_baseline() -> int | None:
    """Bytes used on the baseline's GPUs beyond what was used when it was taken: this
    worker's use, plus whatever other processes on those GPUs started since. None
    without a baseline or NVML."""
    if not _baseline:
        return None
    now = _device_used(list(_baseline), _baseline_visible[0])
    if now is None:
        return None
    return sum(max(0, now[i] - base) for i, base in _baseline.items() if i in now)


def pick_free_gpu(taken: set[str]) -> str | None:
    """Index (as text) of the GPU with the most free memory that no other worker has
    taken, for a worker started without CUDA_VISIBLE_DEVICES; None without NVML (then
    CUDA picks)."""
    free = [(str(g["index"]) not in taken, g["free_bytes"], str(g["index"]))
            for g in gpu_inventory(None)]
    return max(free)[2] if free else None


def _visible_devices(pynvml, visible: str | None) -> list[tuple[int, object]]:
    """(NVML index of the GPU, NVML handle) of each device CUDA shows for
    CUDA_VISIBLE_DEVICES = `visible`, in CUDA's order; every GPU when None. As CUDA
    reads it: an entry is an index, a GPU UUID (`GPU-…`) or a MIG slice's UUID
    (`MIG-…`), or a unique prefix of one; the list ends at the first entry that
    names no device (`-1` included). A MIG slice's handle is its own, so its memory
    info is the slice's, not the whole GPU's."""
    count = pynvml.nvmlDeviceGetCount()
    gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    if visible is None:
        return list(enumerate(gpus))
    named: list[tuple[int, object, str]] | None = None  # (index, handle, uuid), read once
    found: list[tuple[int, object]] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            match = [(int(entry), gpus[int(entry)])] if int(entry) < count else []
        elif entry.startswith(("GPU-", "MIG-")):
            named = _named_devices(pynvml, gpus) if named is None else named
            match = [(i, h) for i, h, uuid in named if uuid.startswith(entry)]
        else:
            match = []
        if len(match) != 1:
            if entry and entry != "-1":
                log.warning("[Worker] CUDA_VISIBLE_DEVICES entry %r names %s; CUDA shows "
                            "only the devices before it", entry,
                            "several devices" if match else "no device")
            break
        found.append(match[0])
    return found


def _named_devices(pynvml, gpus: list) -> list[tuple[int, object, str]]:
    """(NVML index, handle, UUID) of every GPU and of every MIG slice on one."""
    named = []
    for i, handle in enumerate(gpus):
        named.append((i, handle, str(pynvml.nvmlDeviceGetUUID(handle))))
        try:
            slots = pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)
        except pynvml.NVMLError:  # not MIG-capable
            continue
        for j in range(slots):
            try:
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
            except pynvml.NVMLError:  # an empty slot, or MIG off
                continue
            named.append((i, mig, str(pynvml.nvmlDeviceGetUUID(mig))))
    return named


def gpu_inventory(visible: str | None) -> list[dict]:
    """Name, total and free memory of the devices CUDA shows for CUDA_VISIBLE_DEVICES =
    `visible` (all GPUs when None; see `_visible_devices`), read with NVML; `index` is
    the NVML index of the GPU (of the GPU a MIG slice is on). An empty list without
    NVML or a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError or NVMLError: no GPUs to report
        return []
    try:
        found = []
        for i, handle in _visible_devices(pynvml, visible):
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                          "total_bytes": int(info.total), "free_bytes": int(info.free)})
        return found
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()
