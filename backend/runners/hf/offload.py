"""The transformers runner's weights as the model manager moves them: to the CPU (a
kept host copy, pinned or not) and back, their sizes, and release."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def pinned_block_bytes(nbytes: int) -> int:
    """Host memory torch's caching host allocator takes to pin `nbytes`: the next power
    of two (ATen/core/CachingHostAllocator.h rounds every block with PowerOf2Ceil
    under its default thresholds), so a 22 MiB weight takes 32 MiB."""
    return 1 << max(0, nbytes - 1).bit_length() if nbytes > 0 else 0


class Offloader:
    """HFRunner's placement for the model manager (HeldModel's size, offload, restore
    and close). Reads the runner's `model` and `device`; keeps `_host` (the CPU copy of
    every weight, once made) and `host_pinned`; drops the caches of a pass first
    (`forget_prefixes`, Generator's), since they live on the device too."""

    model: Any
    tokenizer: Any
    tok: Any
    device: str
    _host: dict[str, Any] | None
    host_pinned: bool
    forget_prefixes: Callable[[], None]

    def _tensors(self):
        for name, param in self.model.named_parameters():
            yield name, param
        for name, buf in self.model.named_buffers():
            yield "buffer:" + name, buf

    def size_bytes(self) -> int:
        """Bytes of the model's weights and buffers (one copy)."""
        return sum(t.numel() * t.element_size() for _, t in self._tensors())

    def host_bytes(self) -> int:
        """Bytes of RAM the kept CPU copy holds while the model is on the GPU."""
        if self._host is None or self.device == "cpu":
            return 0
        return sum(t.numel() * t.element_size() for t in self._host.values())

    def ram_bytes(self) -> int:
        """Weights and buffers in RAM now (a device map may leave some layers on the
        CPU) plus the CPU copy kept while the model is on the GPU."""
        return self.host_bytes() + sum(t.numel() * t.element_size()
                                       for _, t in self._tensors() if t.device.type == "cpu")

    def pinned_bytes(self) -> int:
        """Pinned host memory an offload with `pin` takes: one block per weight and
        buffer, each rounded by the host allocator (see pinned_block_bytes)."""
        return sum(pinned_block_bytes(t.numel() * t.element_size()) for _, t in self._tensors())

    def movable(self) -> bool:
        """False for a model placed by accelerate hooks (a device map): it is released,
        never moved, since moving it under its hooks would break their bookkeeping."""
        return not any(hasattr(m, "_hf_hook") for m in self.model.modules())

    def offload(self, pin: bool) -> int:
        """Put the model on the CPU; returns bytes copied (0 when a copy was kept).

        Weights do not change during evaluation, so the first offload keeps a CPU
        copy (in pinned memory when `pin`) and later offloads only drop the GPU
        copy: milliseconds instead of a device-to-host copy.
        """
        import torch

        self.forget_prefixes()  # a shared prefix's cache and the static cache live there
        if self.device == "cpu":
            return 0
        copied = 0
        if self._host is None:
            host = {}
            for name, t in self._tensors():
                cpu = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                cpu.copy_(t.detach(), non_blocking=pin)
                host[name] = cpu
                copied += t.numel() * t.element_size()
            torch.cuda.synchronize()
            self._host, self.host_pinned = host, pin
        for name, t in self._tensors():
            t.data = self._host[name]
        self.device = "cpu"
        return copied

    def restore(self, device: str = "cuda:0", background: bool = False) -> int:
        """Copy the CPU copy back to `device` with non-blocking copies and one sync.

        With `background` (a prefetch beside a running job) the copies go on a side
        stream, not queued behind the job's kernels on the default stream; this thread
        waits for that stream alone, and the new weights are marked as used by the
        default stream (where the next job reads them), so the allocator does not hand
        their memory to the side stream again while such a job may still read it."""
        import torch

        if self.device != "cpu" or self._host is None:
            return 0
        names = [name for name, _ in self._tensors()]
        if background:
            side = torch.cuda.Stream(device)
            with torch.cuda.stream(side):
                moved = {name: self._host[name].to(device, non_blocking=True)
                         for name in names}
            side.synchronize()
            readers = torch.cuda.default_stream(device)
            for t in moved.values():
                t.record_stream(readers)
        else:
            moved = {name: self._host[name].to(device, non_blocking=True) for name in names}
            torch.cuda.synchronize()
        for name, t in self._tensors():
            t.data = moved[name]
        self.device = device
        return self.size_bytes()

    def close(self) -> None:
        """Drop the model; the model manager collects garbage and empties caches after.

        A model that generation compiled also resets torch.compile's caches: they hold
        the compiled decode step and, on CUDA, its CUDA-graph memory pools, which nothing
        else frees (torch._dynamo.reset calls reset_cudagraph_trees). The reset is
        process-wide: another cached model recompiles on its next use."""
        compiled = self.model is not None and "_compiled_call" in self.model.__dict__
        if compiled:
            del self.model._compiled_call  # model -> compiled call -> model
        self.forget_prefixes()
        self.model = None
        self.tokenizer = None
        self.tok = None
        self._host = None
        if compiled:
            import torch

            torch.compiler.reset()
