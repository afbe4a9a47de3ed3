"""The worker's end of the command channel (backend.queue.control): it publishes its
model manager's status and applies the server's commands (offload, release, pin,
unpin, timeout, limit, cleanup) to it, from a control thread of its own."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backend.queue.control import Commands

if TYPE_CHECKING:  # the manager loads torch, which the worker imports once it starts
    from backend.engine.memory.manager import ModelManager

log = logging.getLogger(__name__)


def apply_command(manager: ModelManager, command: str,
                  args: dict[str, Any]) -> tuple[dict | None, str | None]:
    """Run one control command on the model manager: (result, None) or (None, error)."""
    from backend.engine.memory.entries import MemoryLimitError, ModelBusy, UnknownModel

    m = manager
    model = args.get("model")
    try:
        if command == "offload":
            if not m.has_gpu:
                m.offload(model)  # nothing to move; raises UnknownModel for a wrong name
                return {"offloaded": [], "has_gpu": False,
                        "message": "this worker has no GPU: models stay in RAM"}, None
            return {"offloaded": m.offload(model), "has_gpu": True}, None
        if command == "release":
            events = m.release(model)
            freed = sum(max(0, e["rss_before_bytes"] - e["rss_after_bytes"])
                        for e in events)
            return {"released": events, "freed_rss_bytes": freed,
                    "freed_rss_mb": round(freed / 2**20, 1)}, None
        if command in ("pin", "unpin"):
            m.set_pinned(model, command == "pin")
            return {"model": model, "pinned": command == "pin"}, None
        if command == "timeout":
            m.set_idle_timeout(float(args["timeout"]))
            return {"idle_timeout_seconds": m.config.idle_timeout}, None
        if command == "limit":
            return {"memory_limit": int(args["bytes"]),
                    "cleanup": m.set_limit(int(args["bytes"]))}, None
        if command == "cleanup":
            return m.cleanup(force=bool(args.get("force"))), None
        return None, f"unknown_command: {command}"
    except UnknownModel as exc:
        return None, f"unknown_model: {exc}"
    except ModelBusy as exc:
        return None, f"busy: {exc}"
    except MemoryLimitError as exc:
        return None, f"memory_limit: {exc}"


class ManagerChannel:
    """Worker `worker_id`'s model manager as the server sees it: its status, published
    after every model move, right after a command and about once a second for idle
    changes (`status_interval`), and the commands it applies. `current_job` says which
    job the worker runs (published with the status)."""

    def __init__(self, worker_id: str, device: str, manager: ModelManager,
                 commands: Commands, current_job: Callable[[], int | None],
                 committed_since: Callable[[], bool] = lambda: True):
        self.worker_id, self.device = worker_id, device
        self.committed_since = committed_since
        """Whether anyone committed since the last call (notify.CommitWatch): no new
        command can be pending otherwise, so the loop skips reading them."""
        self.manager = manager
        self.commands = commands
        self.current_job = current_job
        self.status_interval = 1.0  # seconds between publications of idle changes
        self._moved = threading.Event()  # a model moved: publish the status now
        manager.on_move = lambda _event: self._moved.set()
        self._publishing = threading.Lock()

    def apply_stored_settings(self) -> None:
        """Apply the operator's run-time settings (POST /api/gpu/timeout, /api/v1/memory/
        limit), stored in the database. Called after the first status is published: a
        change made while this worker starts is then either read here or sent to it."""
        for command, args in self.commands.stored():
            result, error = apply_command(self.manager, command, args)
            log.info("[Worker] stored setting %s %s: %s", command, args, error or result)
        self.publish_status()

    def publish_status(self) -> None:
        """Write the model manager's status with `as_of`, the time it describes. One
        publication at a time, so a status taken earlier never overwrites a later one."""
        with self._publishing:
            status = self.manager.status()
            status.update(worker_id=self.worker_id, device=self.device,
                          current_job_id=self.current_job(), as_of=time.time())
            self.commands.publish_status(self.worker_id, status)

    def serve(self, stopping: threading.Event) -> None:
        """The control thread: apply pending commands and publish, until `stopping`."""
        last_publish = 0.0
        while not stopping.is_set():
            moved = self._moved.wait(0.2)
            self._moved.clear()
            try:
                pending = self.commands.pending(self.worker_id) \
                    if self.committed_since() else []
                for command in pending:
                    result, error = apply_command(self.manager, command.command,
                                                  command.args or {})
                    # publish first, so whoever reads the answer also reads the new state
                    self.publish_status()
                    self.commands.complete(command.id, result, error)
                if moved or time.monotonic() - last_publish >= self.status_interval:
                    self.publish_status()
                    last_publish = time.monotonic()
            except Exception:  # noqa: BLE001 - the control loop must outlive a busy database
                log.exception("[Worker] control loop pass failed; retrying")
