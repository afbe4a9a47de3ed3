"""Workers placed on a Ray cluster: each a Ray actor holding its GPUs as Ray resources
(`num_gpus`, and custom resources such as a GPU kind), running the ordinary worker loop
against the shared queue in the actor's own process.

Ray gives the actor its GPUs (CUDA_VISIBLE_DEVICES), the worker reads them as a worker
started by hand does. An actor whose worker loop ended (its idle exit, its run time) is
killed so Ray frees its resources; one that died (killed, its node lost) is forgotten,
and the controller places another while there is work: the job it ran comes back to
the queue when its lease expires and resumes after its stored samples.

`ray` is imported only here, when a Ray pool is used (`pip install
'llm-bench-shower[cluster]'`); the server never imports it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from backend.queue.cluster import PoolShape

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0
"""How long `close` waits for workers to give their jobs back before killing them."""


class RayWorkerActor:
    """The body of one Ray-placed worker (wrapped by `ray.remote` in `RayPool`). Two
    calls may run at once (`max_concurrency=2`), so `stop` reaches a running `run`."""

    def __init__(self, overrides: dict[str, str], worker_id: str):
        self.overrides, self.worker_id = overrides, worker_id
        self.worker: Any = None
        self.stopped = False

    def run(self, idle_exit_s: float | None, max_runtime_s: float | None) -> int:
        """Run the worker loop until it ends; its exit status (see Worker.run_forever)."""
        from backend.apps.worker import Worker
        from backend.apps.worker_process import warm_up
        from backend.common.config import apply_allocator_settings, load_settings
        from backend.common.logs import setup_logging

        settings = load_settings(self.overrides)
        setup_logging(settings.log_level)
        apply_allocator_settings(settings)  # before torch initialises CUDA
        warm_up()
        self.worker = Worker(settings, worker_id=self.worker_id)
        if self.stopped:  # stopped while it was starting
            return 0
        return self.worker.run_forever(idle_exit_s=idle_exit_s, max_runtime_s=max_runtime_s)

    def stop(self) -> None:
        """Stop between two samples, giving the running job back."""
        self.stopped = True
        if self.worker is not None:
            self.worker.stop()


class RayPool:
    """A `WorkerEngine` on Ray (see controller.py): connect with `ray.init` first (or
    let `RayPool` start a local Ray). `cpus` and `resources` are what each actor asks
    of Ray beside `pool.gpus` GPUs; `max_runtime_s` is passed to each worker."""

    name = "ray"

    def __init__(self, pool: PoolShape, overrides: dict[str, str], *,
                 idle_exit_s: float | None, max_runtime_s: float | None = None,
                 cpus: float = 1.0, resources: dict[str, float] | None = None):
        import ray

        self.ray = ray
        self.pool, self.overrides = pool, overrides
        self.idle_exit_s, self.max_runtime_s = idle_exit_s, max_runtime_s
        self.actor = ray.remote(max_concurrency=2, max_restarts=0)(RayWorkerActor).options(
            num_gpus=pool.gpus, num_cpus=cpus, resources=dict(resources or {}))
        self.held: dict[str, tuple[Any, Any]] = {}  # worker id -> (actor, its run's ref)
        self.count = 0

    def place(self, count: int) -> None:
        for _ in range(count):
            self.count += 1
            worker_id = f"{self.pool.name}-{self.count}-{uuid.uuid4().hex[:6]}"
            actor = self.actor.remote(self.overrides, worker_id)
            self.held[worker_id] = (actor, actor.run.remote(self.idle_exit_s,
                                                            self.max_runtime_s))
            log.info("[Cluster] placed Ray worker %s (%d GPU%s)", worker_id, self.pool.gpus,
                     "" if self.pool.gpus == 1 else "s")

    def placed(self) -> int:
        refs = {ref: worker_id for worker_id, (_, ref) in self.held.items()}
        if refs:
            ended, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0)
            for ref in ended:
                self._forget(refs[ref], ref)
        return len(self.held)

    def _forget(self, worker_id: str, ref: Any) -> None:
        actor, _ = self.held.pop(worker_id)
        try:
            status = self.ray.get(ref)
            log.info("[Cluster] Ray worker %s ended (exit status %d)", worker_id, status)
        except self.ray.exceptions.RayError as exc:
            log.warning("[Cluster] Ray worker %s died (%s); its job resumes elsewhere when "
                        "its lease expires", worker_id, type(exc).__name__)
        self.ray.kill(actor)  # frees its GPUs and CPUs in Ray

    def workers(self) -> dict[str, Any]:
        """The actors held, by worker id."""
        return {worker_id: actor for worker_id, (actor, _) in self.held.items()}

    def close(self) -> None:
        for actor, _ in self.held.values():
            actor.stop.remote()
        refs = [ref for _, ref in self.held.values()]
        ended = set(self.ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S)[0]) \
            if refs else set()
        for worker_id, (actor, ref) in list(self.held.items()):
            if ref in ended:
                self._forget(worker_id, ref)
            else:
                log.warning("[Cluster] Ray worker %s did not stop within %.0f s; killed",
                            worker_id, STOP_GRACE_S)
                self.held.pop(worker_id)
                self.ray.kill(actor)
