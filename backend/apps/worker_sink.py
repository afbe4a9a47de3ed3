"""Where a running job's results and progress go: the queue, each sample as it is scored."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from backend.queue.db import utcnow
from backend.queue.jobs import Queue


class SinkOwner(Protocol):
    """What a sink reads of its worker (backend.apps.worker.Worker)."""

    id: str
    queue: Queue
    stopping: threading.Event
    cancel_seen: threading.Event

log = logging.getLogger(__name__)


class DbSink:
    """SampleSink that writes each result to the database as it comes, and stops the
    loop when the job is cancelled, the worker is stopping, or the job timed out."""

    def __init__(self, worker: SinkOwner, job_id: int, timeout_s: float | None = None,
                 download: dict[str, Any] | None = None):
        self.worker = worker
        self.job_id = job_id
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self.timed_out = False
        self.download = download
        """The running `model_download` event of a hub model the load fetches, if any."""

    def end_download(self, state: str) -> bool:
        """End the job's model download phase (`done` or `failed`); False if none ran."""
        if self.download is None:
            return False
        ended, self.download = {**self.download, "state": state,
                                "at": utcnow().isoformat()}, None
        self.worker.queue.record_phase(self.job_id, self.worker.id, ended)
        return True

    def stored(self) -> dict[int, tuple[dict, float]]:
        done = self.worker.queue.stored_samples(self.job_id)
        if done:
            log.info("[Worker] job %d resumes after %d stored samples", self.job_id, len(done))
        return done

    def set_total(self, total: int) -> None:
        if self.worker.queue.set_total(self.job_id, self.worker.id, total):
            self.worker.cancel_seen.set()  # cancelled while the data loaded

    def set_manifest(self, manifest: dict[str, Any]) -> None:
        self.end_download("done")  # the manifest comes once the model has loaded
        self.worker.queue.record_manifest(self.job_id, self.worker.id, manifest)

    def write(self, record: Any) -> bool:
        values = {k: getattr(record, k) for k in (
            "idx", "prompt", "prompt_tokens", "prediction", "score", "latency_s",
            "output_tokens", "fields", "peak_rss_bytes", "peak_own_rss_bytes", "peak_gpu_bytes",
            "error")}
        cancel = self.worker.queue.record_sample(self.job_id, self.worker.id, values)
        if cancel:
            self.worker.cancel_seen.set()
        return not self.should_stop()

    def should_stop(self) -> bool:
        """Cancelled (seen by the heartbeat or the last write), timed out, or the worker
        is stopping: the evaluation loop and waiting runners stop."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
        return self.timed_out or self.worker.cancel_seen.is_set() or \
            self.worker.stopping.is_set()


def data_progress(queue: Queue, worker_id: str, job_id: int,
                  dataset: str) -> Callable[[int, int | None], None]:
    """The progress callback of a data fetch: the job shows a running `data_fetch`
    event (the "fetching data" phase) with its bytes."""
    logged = [0.0]

    def report(done: int, total: int | None) -> None:
        if time.monotonic() - logged[0] >= 5 or done == total:  # a line every 5 s
            logged[0] = time.monotonic()
            log.info("[Worker] job %d: fetching data for %s: %d of %s bytes", job_id,
                     dataset, done, "?" if total is None else total)
        queue.record_phase(job_id, worker_id, {
            "kind": "data_fetch", "state": "running", "dataset": dataset,
            "bytes_done": done, "bytes_total": total, "at": utcnow().isoformat()})
    return report
