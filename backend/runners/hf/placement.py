"""GPU memory cap: LBS_GPU_MEMORY_LIMIT for the whole process, and where weights go.

With a limit `f` > 0 and CUDA present, two things hold:

- **The process** (`cap_process_memory`): PyTorch's caching allocator of this process
  may reserve at most `f` x total on each visible GPU
  (`torch.cuda.set_per_process_memory_fraction`): weights, KV cache, activations,
  CUDA-graph pools, everything allocated through PyTorch. An allocation past it is
  an out-of-memory error (handled like any other: the batch halves). Not counted: the
  CUDA context (a few hundred MB per process) and memory that libraries allocate
  outside PyTorch's allocator.
- **The weights** (`load_placement`): each GPU `i` the job uses gets
  `max_memory[i]` = `total_i * f` less what the job holds on it beyond the weights
  (`Headroom`, from the memory account, account.py: the KV cache follows the layers, the
  activations are on each GPU, the logits on the last), and a `cpu` entry of the RAM
  available now, so layers that do not fit spill to RAM instead of failing when the
  job runs.

A job with `num_gpus` > 1 gets a map over its first `num_gpus` visible GPUs (whole GPUs
when there is no limit), which shards the model's layers across them. Without a limit
on one GPU the model goes straight onto it (`device_map={"": "cuda:0"}`), never
through RAM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil

from backend.common.units import format_bytes

log = logging.getLogger(__name__)


_capped: dict[int, float] = {}
"""Devices whose allocator cap_process_memory capped, and at what fraction."""


def gpu_totals() -> list[int]:
    """Total bytes of each visible CUDA device (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory
            for i in range(torch.cuda.device_count())]


@dataclass(frozen=True)
class Headroom:
    """What a job holds on its GPUs beyond the weights, by where it lands: `layers`
    follows the decoder layers (their KV cache: a GPU holding a third of the layers holds
    a third of it), `each` is needed on every GPU that runs layers (one layer's
    activations and workspace, the attention mask), `last` only on the GPU of the output
    head (the logits). `layer_weights` is the weight bytes of the layers that hold the
    KV cache (the decoder layers: not the embeddings or the head), which a GPU's share
    of `layers` is measured by; 0 keeps all of `layers` free on every GPU. A plain
    number of bytes is kept free on every GPU (`each`).

    `layer_bytes` (one decoder layer's weights) and `largest_module` (the largest
    module placed whole, often the embeddings) are what a sharded placement may leave
    unused: accelerate puts whole layers on a GPU, so each GPU but the last may end up
    to one layer short of its room, and it keeps the largest module's size free on the
    first GPU (accelerate/utils/modeling.py infer_auto_device_map)."""

    layers: int = 0
    each: int = 0
    last: int = 0
    layer_weights: int = 0
    layer_bytes: int = 0
    largest_module: int = 0

    def sharded(self, num_gpus: int) -> int:
        """Bytes a model sharded over `num_gpus` GPUs needs beyond its weights: `total`,
        plus one layer's activations on every further GPU (each runs its layers in
        turn) and what placing whole layers leaves unused (see above)."""
        if num_gpus <= 1:
            return self.total
        return self.total + (num_gpus - 1) * (self.each + self.layer_bytes) + \
            self.largest_module

    @property
    def total(self) -> int:
        return self.layers + self.each + self.last


def _weights_room(caps: list[int], headroom: Headroom) -> list[int]:
    """Bytes of weights each GPU may take so that they, the KV cache of the layers among
    them, the per-GPU work and (on the last GPU) the logits fit under its cap.

    A GPU holding weights w holds the KV cache of at most w bytes of layers, i.e. at most
    `layers x w / layer_weights` (less where some of w is the embeddings or the head),
    hence w x (1 + layers / layer_weights) <= cap - each (- last). When the GPUs cannot
    take every layer, the layers that spill run on GPU 0 (accelerate's offload hooks
    execute them on the first device), so their KV cache lands there: GPU 0 then keeps
    the whole KV cache free, as one GPU does.
    """
    n = len(caps)
    free = [cap - headroom.each - (headroom.last if i == n - 1 else 0)
            for i, cap in enumerate(caps)]
    per_weight = headroom.layer_weights
    if headroom.layers <= 0 or per_weight <= 0:
        return [max(0, f - headroom.layers) for f in free]
    room = [max(0, f * per_weight // (per_weight + headroom.layers)) for f in free]
    if n == 1 or sum(room) < per_weight:
        room[0] = max(0, free[0] - headroom.layers)
    return room


def build_max_memory(fraction: float, totals: list[int] | None = None,
                     cpu_bytes: int | None = None,
                     num_gpus: int | None = None,
                     headroom_bytes: int | Headroom = 0) -> dict[int | str, int] | None:
    """`max_memory` for accelerate, or None when the model goes whole onto one GPU
    (no limit and one GPU used) or there is no GPU.

    `totals` defaults to the visible GPUs' sizes and `cpu_bytes` to the RAM
    available now; both can be given to compute a map for other hardware.
    `num_gpus` (default: one when there is no limit, else all visible) is how many
    of the visible GPUs the model is spread over. Each GPU keeps free of weights what
    the job will hold on it (`headroom_bytes`, split by where it lands: `Headroom`;
    a plain number is kept free on every GPU): transformers
    leaves headroom of its own only when it is not given `max_memory`
    (integrations/accelerate.py get_balanced_memory), and the process cap
    (`cap_process_memory`) makes a job whose KV cache finds no room fail.
    """
    totals = gpu_totals() if totals is None else totals
    if num_gpus is not None:
        totals = totals[:max(1, num_gpus)]
    elif fraction <= 0:
        totals = totals[:1]
    if not totals or (fraction <= 0 and len(totals) == 1):
        return None
    share = fraction if fraction > 0 else 1.0
    headroom = headroom_bytes if isinstance(headroom_bytes, Headroom) else \
        Headroom(each=max(0, int(headroom_bytes)))
    caps = [int(total * share) for total in totals]
    max_memory: dict[int | str, int] = dict(enumerate(
        _weights_room(caps, headroom)))
    max_memory["cpu"] = int(psutil.virtual_memory().available if cpu_bytes is None else cpu_bytes)
    what = "GPU memory limit set" if fraction > 0 else f"model sharded over {len(totals)} GPUs"
    log.info("[Runner] %s: %s", what,
             ", ".join(f"cuda:{i} {format_bytes(max_memory[i])} of {format_bytes(t)} "
                       f"({share:.0%} less {format_bytes(caps[i] - max_memory[i])} for the "
                       "job's KV cache, activations and logits there) for weights"
                       for i, t in enumerate(totals))
             + f"; cpu {format_bytes(max_memory['cpu'])}")
    return max_memory


def load_placement(fraction: float, num_gpus: int = 1, headroom_bytes: int | Headroom = 0,
                   totals: list[int] | None = None,
                   cpu_bytes: int | None = None) -> dict[str, object]:
    """`from_pretrained` keyword arguments that place the weights on CUDA: the whole
    model straight onto cuda:0 when there is no limit and one GPU is used (transformers
    then loads every tensor onto it: no copy through RAM, no RAM peak the model's
    size), else `device_map="auto"` under `build_max_memory`. Empty without a GPU."""
    totals = gpu_totals() if totals is None else totals
    if not totals:
        return {}
    max_memory = build_max_memory(fraction, totals, cpu_bytes, num_gpus, headroom_bytes)
    if max_memory is None:
        return {"device_map": {"": "cuda:0"}}
    return {"device_map": "auto", "max_memory": max_memory}


def cap_process_memory(fraction: float) -> list[tuple[int, float]]:
    """Cap this process's PyTorch allocator at `fraction` of each visible GPU (see the
    module docstring for what it counts); returns the (device, fraction) pairs set.
    Nothing without CUDA; without a limit, lifts (back to 1.0) a cap set earlier.
    Safe to call before every load: setting the same fraction again changes nothing
    (torch/cuda/memory.py set_per_process_memory_fraction starts CUDA first if needed)."""
    import torch

    if not torch.cuda.is_available():
        return []
    if fraction <= 0:  # no limit: lift a cap an earlier load of this process set
        lifted = [(i, 1.0) for i in sorted(_capped)]
        for i, whole in lifted:
            torch.cuda.set_per_process_memory_fraction(whole, i)
        _capped.clear()
        return lifted
    done = []
    for i in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(float(fraction), i)
        done.append((i, float(fraction)))
        _capped[i] = float(fraction)
    log.info("[Runner] GPU memory limit holds for this process: PyTorch may reserve at most "
             "%.0f%% of %s", fraction * 100, ", ".join(f"cuda:{i}" for i, _ in done))
    return done


def spills(model) -> bool:
    """Whether accelerate placed some of the model's layers in CPU RAM or on disk."""
    placed = set((getattr(model, "hf_device_map", None) or {}).values())
    return "disk" in placed or ("cpu" in placed and len(placed) > 1)


def room_bytes(devices: list[str]) -> int | None:
    """Bytes this process may still allocate on the CUDA `devices` a model uses: on each,
    the smaller of what the device has free (with what this process's allocator holds
    unused) and the allocator's cap (LBS_GPU_MEMORY_LIMIT, set by cap_process_memory,
    read back as torch's per-process fraction) less what is allocated; for a model
    spread over several GPUs, the tightest device's room on each (its layers' share of
    the KV cache is about even). None without CUDA devices: the CPU's RAM is not
    probed."""
    import torch

    cuda = [d for d in devices if str(d).startswith("cuda")]
    if not cuda or not torch.cuda.is_available():
        return None
    rooms = []
    for device in cuda:
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        unused = torch.cuda.memory_reserved(device) - allocated
        cap = int(torch.cuda.get_per_process_memory_fraction(device) * total) - allocated
        rooms.append(max(0, min(free + unused, cap)))
    return min(rooms) * len(rooms)

