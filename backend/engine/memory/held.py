"""What the model manager asks of a model it holds: its bytes, where it is, and how
to move or free it. Runners implement it (backend.runners.base.Runner derives from
it); the manager knows nothing else of them."""

from __future__ import annotations


class HeldModel:
    """What the model manager (backend.engine.memory.manager) asks of a model it holds.

    The defaults describe a model that holds nothing locally (a remote API): no
    bytes, not on a GPU, nothing to move. A runner with weights in this process
    overrides them all (see HFRunner).
    """

    device: str = "cpu"
    """Where the weights are now: "cuda:<i>" puts the model on the manager's GPU list."""
    host_pinned: bool = False
    """Whether the CPU copy kept by `offload` is in pinned memory (counted against
    the pinned budget)."""

    def size_bytes(self) -> int:
        """Bytes of the weights (one copy), wherever they are."""
        return 0

    def host_bytes(self) -> int:
        """RAM a kept CPU copy holds while the model is on the GPU."""
        return 0

    def ram_bytes(self) -> int:
        """RAM the weights hold now: all of them on the CPU, else the kept CPU copy.
        A job's own memory counts these, so a model already loaded counts as if the
        job had loaded it."""
        return self.host_bytes() if str(self.device).startswith("cuda") else self.size_bytes()

    def pinned_bytes(self) -> int:
        """Pinned host memory an `offload(pin=True)` would take."""
        return self.size_bytes()

    def movable(self) -> bool:
        """Whether `offload`/`restore` can move the model; a model that cannot be moved
        (a device map over several GPUs, or nothing local) is released instead."""
        return False

    def offload(self, pin: bool) -> int:
        """Move the weights to CPU RAM (pinned when `pin`); bytes copied."""
        return 0

    def restore(self, device: str = "cuda:0", background: bool = False) -> int:
        """Move the weights back to `device`; bytes copied. `background`: another job
        runs meanwhile (a prefetch), so the copy should not wait behind its work."""
        return 0

    def close(self) -> None:
        """Drop every reference to the model and tokenizer so their memory can be freed."""
        return None
