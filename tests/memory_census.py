"""A census of live tensor storage on the CPU: the oracle the memory account is checked
against (what a path holds beyond the weights must be what admission counts).

    with StorageCensus() as census:
        runner.generate(requests)
    census.peak_bytes   # most bytes of storage allocated inside the block alive at once
    census.where        # the op and the code line where that peak was reached
    census.held_bytes   # what is still alive when the block ends (a kept prefix cache)

It is a `TorchDispatchMode`: every aten op run inside the block, in our code or in
transformers (masks, caches, logits, the float32 log_softmax copy), passes through it.
After each op the storages of its outputs are registered, by `data_ptr`, with a weak
reference to each tensor that views them; a weak reference's callback, when the last
tensor on a storage dies, takes its bytes off the running total. So the total is exact
after every op (inputs and outputs of an op are alive together then, which is the peak
an op makes) and costs no scan of the heap.

What counts is storage first seen as an op's output inside the block. Tensors that
existed before it (the model's weights and buffers, a cache kept from an earlier call,
the caller's inputs) are registered as outside the count the first time an op reads
them, so a view of a weight (`weight.t()`) is never counted. Load the model before the
block. Memory an op uses internally and frees before it returns (a fused kernel's
workspace) is not seen: on the CPU SDPA's is a few rows, and the account states it
apart.
"""

from __future__ import annotations

import os
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_OURS = os.sep + "backend" + os.sep
_TRANSFORMERS = os.sep + "transformers" + os.sep


class _Storage:
    """One storage: its bytes, whether it counts, and how many tensors on it live."""

    __slots__ = ("nbytes", "counted", "alive")

    def __init__(self, nbytes: int, counted: bool):
        self.nbytes, self.counted, self.alive = nbytes, counted, 0


class StorageCensus(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the block and alive at once.

    `exclude`: modules or tensors whose storage never counts even if first seen as an
    op's output (weights made inside the block); their parameters and buffers are
    registered up front. Attributes after (or during) the block: `peak_bytes`,
    `where` (op and code line at the peak), `held_bytes` (alive now), `ops` (ops seen).
    """

    def __init__(self, *exclude, detail: bool = False):
        super().__init__()
        self._detail = detail
        self.at_peak: list[tuple[int, str]] = []
        """With `detail`: (bytes, op that made it) of each counted storage alive at the
        peak, largest first: what a path holds, to read against its account."""
        self._storages: dict[int, _Storage] = {}
        self._made: dict[int, str] = {}  # data_ptr -> the op that made it (with `detail`)
        self._tensors: dict[int, weakref.ref] = {}  # id(tensor) -> tensor, each noted once
        self._excluded: set[int] = set()
        for item in exclude:
            tensors = (list(item.parameters()) + list(item.buffers())
                       if isinstance(item, torch.nn.Module) else [item])
            self._excluded.update(_pointer(t) for t in tensors)
        self.held_bytes = 0
        self.peak_bytes = 0
        self.where = ""
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs, _ = tree_flatten((args, kwargs or {}))
        for t in inputs:
            if isinstance(t, torch.Tensor):
                self._register(t, counted=False)
        out = func(*args, **(kwargs or {}))
        outputs, _ = tree_flatten(out)
        for t in outputs:
            if isinstance(t, torch.Tensor):
                self._register(t, counted=True)
                if self._detail and _pointer(t) not in self._made:
                    self._made[_pointer(t)] = f"{func} {tuple(t.shape)} {_caller()}"
        self.ops += 1
        if self.held_bytes > self.peak_bytes:
            self.peak_bytes = self.held_bytes
            self.where = f"{func} at {_caller()}"
            if self._detail:
                self.at_peak = sorted(((e.nbytes, self._made.get(p, "?"))
                                       for p, e in self._storages.items() if e.counted),
                                      reverse=True)
        return out

    def _register(self, t: torch.Tensor, counted: bool) -> None:
        """Note `t` on its storage; a storage not seen before counts when `counted`."""
        known = self._tensors.get(id(t))
        if (known is not None and known() is t) or t.device.type == "meta":
            return
        ptr = _pointer(t)
        entry = self._storages.get(ptr)
        nbytes = t.untyped_storage().nbytes()
        if entry is None:
            entry = _Storage(nbytes, counted and ptr not in self._excluded and ptr != 0)
            self._storages[ptr] = entry
            if entry.counted:
                self.held_bytes += nbytes
        elif entry.nbytes != nbytes:  # resized in place
            if entry.counted:
                self.held_bytes += nbytes - entry.nbytes
            entry.nbytes = nbytes
        key = id(t)
        try:
            self._tensors[key] = weakref.ref(t, lambda _: self._dropped(key, ptr, entry))
        except TypeError:  # a tensor subclass without weak references: not tracked
            return
        entry.alive += 1

    def _dropped(self, key: int, ptr: int, entry: _Storage) -> None:
        ref = self._tensors.get(key)
        if ref is not None and ref() is None:
            del self._tensors[key]
        entry.alive -= 1
        if entry.alive == 0 and self._storages.get(ptr) is entry:
            del self._storages[ptr]
            if entry.counted:
                self.held_bytes -= entry.nbytes
            self._made.pop(ptr, None)


def _pointer(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _caller() -> str:
    """The innermost frame of ours and of transformers' below the current op."""
    frame, ours, theirs = sys._getframe(2), None, None
    while frame is not None and not (ours and theirs):
        name = frame.f_code.co_filename
        if ours is None and _OURS in name:
            ours = f"{os.path.basename(name)}:{frame.f_lineno} {frame.f_code.co_name}"
        if theirs is None and _TRANSFORMERS in name:
            theirs = f"{os.path.basename(name)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return " in ".join(s for s in (theirs, ours) if s) or "?"
