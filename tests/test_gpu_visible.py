"""Which GPUs a worker reports when CUDA_VISIBLE_DEVICES names them by UUID (`GPU-…`,
or a MIG slice `MIG-…`), read through a stand-in for nvidia-ml-py's `pynvml` that keeps
its function names and return shapes (pynvml.py 13.x): handles are opaque, strings come
back as `str` (its `convertStrBytes`), memory info has `total`/`free`/`used`, a missing
device or MIG slot raises `NVMLError` whose `value` is the NVML return code."""

from __future__ import annotations

import dataclasses
import sys
from types import SimpleNamespace

import pytest

GiB = 2**30
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6


class FakePynvml:
    """GPUs as (uuid, name, total, free, [MIG slices as (uuid, total, free)])."""

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

    def __init__(self, gpus):
        self.gpus = gpus

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.gpus):
            raise self.NVMLError(2)  # NVML_ERROR_INVALID_ARGUMENT
        return ("gpu", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for i, gpu in enumerate(self.gpus):
            if gpu[0] == uuid:
                return ("gpu", i)
            for j, mig in enumerate(gpu[4]):
                if mig[0] == uuid:
                    return ("mig", i, j)
        raise self.NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle):
        gpu = self.gpus[handle[1]]
        return gpu[0] if handle[0] == "gpu" else gpu[4][handle[2]][0]

    def nvmlDeviceGetName(self, handle):
        name = self.gpus[handle[1]][1]
        return name if handle[0] == "gpu" else f"{name} MIG 1g.10gb"

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self.gpus[handle[1]]
        total, free = gpu[2:4] if handle[0] == "gpu" else gpu[4][handle[2]][1:3]
        return SimpleNamespace(total=total, free=free, used=total - free)

    def nvmlDeviceGetMaxMigDeviceCount(self, device):
        if not self.gpus[device[1]][4]:
            raise self.NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device, index):
        if index >= len(self.gpus[device[1]][4]):
            raise self.NVMLError(NVML_ERROR_NOT_FOUND)
        return ("mig", device[1], index)


A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"
MIG = "MIG-cccccccc-1111-2222-3333-444444444444"


@pytest.fixture
def machine(monkeypatch):
    """Two 80 GiB GPUs; the second is split into MIG slices, one of 10 GiB."""
    fake = FakePynvml([(A, "H100", 80 * GiB, 70 * GiB, []),
                       (B, "H100", 80 * GiB, 60 * GiB, [(MIG, 10 * GiB, 9 * GiB)])])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def _gpus(settings, visible):
    from backend.apps.worker_gpus import detect_gpus

    found = detect_gpus(dataclasses.replace(settings, cuda_visible_devices=visible,
                                            simulated_gpu_memory=()))
    return [(g["index"], g["total_bytes"], g["free_bytes"]) for g in found]


def test_a_gpu_named_by_uuid_is_the_only_one_reported(settings, machine):
    assert _gpus(settings, B) == [(1, 80 * GiB, 60 * GiB)]
    assert _gpus(settings, "GPU-bbbb") == [(1, 80 * GiB, 60 * GiB)]  # CUDA takes a prefix
    assert _gpus(settings, f"{B},{A}") == [(1, 80 * GiB, 60 * GiB), (0, 80 * GiB, 70 * GiB)]


def test_a_mig_slice_reports_its_own_memory_not_the_whole_gpu(settings, machine):
    assert _gpus(settings, MIG) == [(1, 10 * GiB, 9 * GiB)]


def test_cuda_stops_at_the_first_entry_it_cannot_resolve(settings, machine):
    assert _gpus(settings, "0,GPU-ffff,1") == [(0, 80 * GiB, 70 * GiB)]
    assert _gpus(settings, "1") == [(1, 80 * GiB, 60 * GiB)]
    assert _gpus(settings, "-1") == []
    assert len(_gpus(settings, None)) == 2


def test_on_a_mig_slice_the_fallback_reading_is_the_slices_own(machine):
    """Where NVML cannot tell this process's use (a container's PID namespace) the
    tracker falls back to the device's use since the worker started: on a MIG slice,
    that slice's, not the whole GPU's, where other slices' tenants come and go."""
    from backend.engine.memory import gpu

    gpu.take_device_baseline([1], visible=MIG)  # the slice: 1 GiB used
    machine.gpus[1] = (B, "H100", 80 * GiB, 30 * GiB, [(MIG, 10 * GiB, 6 * GiB)])
    assert gpu.device_used_since_baseline() == 3 * GiB  # not the GPU's 30 GiB more
