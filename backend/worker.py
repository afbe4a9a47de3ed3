"""The worker process: claims jobs from the database and runs them, one at a time.

`python -m backend.worker` runs one worker alone (the server starts its own
with `python -m backend.server`; point LBS_DATABASE_URL at a shared PostgreSQL
to run workers on other machines). A worker registers itself in the `workers`
table with its host, labels and GPUs, keeps its row and the lease of its
running job fresh from a heartbeat thread, and stores every sample as soon as
it is scored. It claims only jobs it can run (labels, GPU count, estimated GPU
memory: see scheduling.py); when there is none it waits for a notification
(PostgreSQL) or polls (SQLite). On SIGTERM/SIGINT it stops between two samples
and gives its job back to the queue, where it resumes after the stored samples.

The model manager is created once per worker process and lives as long as it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

from pydantic import ValidationError

from backend.config import (
    Settings,
    apply_allocator_settings,
    load_settings_or_report,
    select_cuda_device,
)
from backend.control import complete_command, pending_commands, publish_status
from backend.datasets.registry import load_plugin_dirs
from backend.db import JobState, session_factory, utcnow
from backend.jobs import (
    LeaseLost,
    claim_job,
    finish_job,
    mark_lost_workers,
    next_queued_model,
    record_data_fetch,
    record_sample,
    register_worker,
    renew_lease,
    requeue_job,
    seconds_to_next_expiry,
    set_total,
    stored_samples,
    worker_heartbeat,
)
from backend.logs import setup_logging
from backend.notify import WorkWaiter
from backend.scheduling import Capacity

log = logging.getLogger(__name__)


class _DbSink:
    """SampleSink that writes each result to the database as it comes, and stops the
    loop when the job is cancelled, the worker is stopping, or the job timed out."""

    def __init__(self, worker: Worker, job_id: int, timeout_s: float | None = None):
        self.worker = worker
        self.job_id = job_id
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self.timed_out = False

    def stored(self) -> dict[int, tuple[dict, float]]:
        done = stored_samples(self.worker.factory, self.job_id)
        if done:
            log.info("[Worker] job %d resumes after %d stored samples", self.job_id, len(done))
        return done

    def set_total(self, total: int) -> None:
        set_total(self.worker.factory, self.job_id, self.worker.id, total)

    def write(self, record: Any) -> bool:
        values = {k: getattr(record, k) for k in (
            "idx", "prompt", "prompt_tokens", "prediction", "score", "latency_s",
            "output_tokens", "fields", "peak_rss_bytes", "peak_gpu_bytes", "error")}
        cancel = record_sample(self.worker.factory, self.job_id, self.worker.id,
                               self.worker.settings.lease_seconds, values)
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
        return not (cancel or self.timed_out or self.worker.cancel_seen.is_set()
                    or self.worker.stopping.is_set())


class Worker:
    """One worker: a model manager, a heartbeat thread and the claim-run loop."""

    def __init__(self, settings: Settings, worker_id: str | None = None,
                 device: str | None = None):
        from backend.memory.manager import ManagerConfig, ModelManager

        self.settings = settings
        load_plugin_dirs(list(settings.plugin_dirs))
        self.factory = session_factory(settings.database_url)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.labels = tuple(dict.fromkeys((*settings.worker_labels, socket.gethostname(),
                                           self.id)))
        self.gpus = detect_gpus(settings)
        self.device = device or _describe_device(settings, self.gpus)
        self.waiter = WorkWaiter(settings.database_url)
        self.manager = ModelManager(ManagerConfig.from_settings(settings))
        self.status_interval = 1.0  # seconds between publications of idle changes
        self._moved = threading.Event()  # a model moved: publish the status now
        self.manager.on_move = lambda _event: self._moved.set()
        self._publishing = threading.Lock()
        self.stopping = threading.Event()
        self.cancel_seen = threading.Event()
        self.current_job: int | None = None
        self._heartbeat: threading.Thread | None = None
        self._control: threading.Thread | None = None

    # --- heartbeat --------------------------------------------------------------

    def capacity(self) -> Capacity:
        """What this worker can run now; GPU memory is read afresh (see `free_gpu_bytes`)."""
        return Capacity(labels=self.labels, gpu_count=len(self.gpus),
                        free_gpu_bytes=self.free_gpu_bytes() if self.gpus else None)

    def free_gpu_bytes(self) -> int:
        """GPU memory a job may use here now: each GPU's free memory, under
        LBS_GPU_MEMORY_LIMIT × its total, plus what this worker's idle models hold on
        the GPU (the model manager makes room by offloading them)."""
        self.gpus = detect_gpus(self.settings) or self.gpus
        fraction = self.settings.gpu_memory_limit
        free = sum(int(min(g["free_bytes"], g["total_bytes"] * (fraction or 1.0)))
                   for g in self.gpus)
        if self.manager.has_gpu:
            free += sum(m["size_bytes"] for m in self.manager.status()["models"]
                        if m["location"] == "gpu" and not m["in_use"])
        return free

    def _beat(self) -> None:
        interval = max(0.2, min(5.0, self.settings.lease_seconds / 4))
        last_sweep = 0.0
        while not self.stopping.wait(interval):
            try:
                job_id = self.current_job
                if job_id is not None:
                    if renew_lease(self.factory, job_id, self.id, self.settings.lease_seconds):
                        self.cancel_seen.set()
                if self.gpus:
                    free = self.free_gpu_bytes()
                    worker_heartbeat(self.factory, self.id, gpus=self.gpus, gpu_free_bytes=free)
                else:
                    worker_heartbeat(self.factory, self.id)
                if time.monotonic() - last_sweep >= 10.0:
                    last_sweep = time.monotonic()
                    for lost in mark_lost_workers(self.factory, self.settings.lease_seconds):
                        log.warning("[Worker] worker %s stopped heartbeating: marked lost; "
                                    "its job goes back to the queue when its lease expires",
                                    lost)
            except LeaseLost as exc:
                log.warning("[Worker] %s", exc)
                self.cancel_seen.set()
            except Exception:  # noqa: BLE001 - the heartbeat must outlive a busy database
                log.exception("[Worker] heartbeat failed; retrying")

    def start(self) -> None:
        register_worker(self.factory, self.id, socket.gethostname(), os.getpid(), self.device,
                        labels=self.labels, gpus=self.gpus,
                        gpu_free_bytes=self.free_gpu_bytes() if self.gpus else None)
        self.publish_status()
        self.manager.start_monitor()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._heartbeat.start()
        self._control = threading.Thread(target=self._serve_commands, name="control",
                                         daemon=True)
        self._control.start()
        log.info("[Worker] %s started on %s", self.id, self.device)

    # --- model manager status and commands ------------------------------------------

    def publish_status(self) -> None:
        """Write the model manager's status with `as_of`, the time it describes. One
        publication at a time, so a status taken earlier never overwrites a later one."""
        with self._publishing:
            status = self.manager.status()
            status.update(worker_id=self.id, device=self.device,
                          current_job_id=self.current_job, as_of=time.time())
            publish_status(self.factory, self.id, status)

    def _serve_commands(self) -> None:
        last_publish = 0.0
        while not self.stopping.is_set():
            moved = self._moved.wait(0.2)
            self._moved.clear()
            try:
                commands = pending_commands(self.factory, self.id)
                for command in commands:
                    result, error = self.apply_command(command.command, command.args or {})
                    # publish first, so whoever reads the answer also reads the new state
                    self.publish_status()
                    complete_command(self.factory, command.id, result, error)
                if moved or time.monotonic() - last_publish >= self.status_interval:
                    self.publish_status()
                    last_publish = time.monotonic()
            except Exception:  # noqa: BLE001 - the control loop must outlive a busy database
                log.exception("[Worker] control loop pass failed; retrying")

    def apply_command(self, command: str, args: dict[str, Any]) -> tuple[dict | None, str | None]:
        """Run one control command on the model manager: (result, None) or (None, error)."""
        from backend.memory.manager import MemoryLimitError, ModelBusy, UnknownModel

        m = self.manager
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

    # --- jobs -------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue was empty."""
        job = claim_job(self.factory, self.id, self.settings.lease_seconds,
                        self.settings.max_attempts, prefer_models=self.manager.loaded(),
                        affinity_seconds=self.settings.affinity_seconds,
                        capacity=self.capacity())
        if job is None:
            return False
        self.run_job(job.id, job.model, job.dataset, job.params,
                     timeout_s=job.timeout_s or self.settings.job_timeout or None,
                     api=job.api, api_key_encrypted=job.api_key_encrypted,
                     num_gpus=job.num_gpus,
                     shard=(job.shard_index, job.shard_count) if job.parent_id else None)
        return True

    def run_job(self, job_id: int, model: str, dataset: str, params: dict[str, Any],
                timeout_s: float | None = None, api: dict[str, Any] | None = None,
                api_key_encrypted: str | None = None, num_gpus: int = 1,
                shard: tuple[int, int] | None = None) -> None:
        from backend.datasets.base import ParamError
        from backend.datasets.registry import UnknownDataset
        from backend.evaluation import JobFieldError, prepare, run_evaluation
        from backend.runners.models import ModelNotFound
        from backend.runners.openai_api import ApiOptions
        from backend.secrets_box import SecretUnreadable, decrypt

        self.current_job = job_id
        self._job_events_from = self.manager.event_count
        self.cancel_seen.clear()
        log.info("[Worker] job %d: %s on %s", job_id, dataset, model)
        if self.manager.has_gpu:
            threading.Thread(target=self._prefetch_next, args=(model,), name="prefetch",
                             daemon=True).start()
        try:
            api_key = decrypt(self.settings, api_key_encrypted) if api_key_encrypted else None
            prepared = prepare(model, dataset, params, self.settings,
                               api=ApiOptions.model_validate(api) if api else None,
                               api_key=api_key, fetch_data=True,
                               data_progress=self._data_progress(job_id, dataset))
            for fetched in prepared.dataset.data_access.fetched:
                record_data_fetch(self.factory, job_id, self.id, {
                    "kind": "data_fetch", "state": "done", "dataset": dataset,
                    "repo_id": fetched["repo_id"], "bytes_done": fetched["bytes"],
                    "bytes_total": fetched["bytes"], "files": fetched["files"],
                    "seconds": fetched["seconds"], "at": utcnow().isoformat()})
            prepared.num_gpus = num_gpus
            prepared.shard = shard
            sink = _DbSink(self, job_id, timeout_s)
            outcome = run_evaluation(
                prepared, self.manager, self.settings, sink,
                keep_on_gpu=lambda: next_queued_model(
                    self.factory, [model], self.settings.affinity_seconds,
                    Capacity(self.labels, len(self.gpus))) == model)
            # publish first, so whoever sees the job end also sees where its model is now
            self._publish_quietly()
            if outcome.stopped and self.stopping.is_set() and not self.cancel_seen.is_set():
                requeue_job(self.factory, job_id, self.id)
                log.info("[Worker] job %d given back to the queue", job_id)
                return
            state = JobState.CANCELLED if outcome.stopped else JobState.SUCCEEDED
            error = None
            if outcome.stopped and sink.timed_out and not self.cancel_seen.is_set():
                state = JobState.FAILED
                error = (f"timed out: ran longer than {timeout_s:g} s "
                         "(job timeout_s or LBS_JOB_TIMEOUT); the samples done are kept")
            finish_job(self.factory, job_id, self.id, state, scores=outcome.scores,
                       memory=outcome.memory, events=outcome.events, error=error,
                       aggregate=prepared.dataset.aggregate if shard else None)
            overall = next((s.value for s in outcome.scores if s.name == "overall"), None)
            log.info("[Worker] job %d %s (overall score %s)", job_id, state.value,
                     "n/a" if overall is None else f"{overall:.4f}")
        except LeaseLost as exc:
            log.warning("[Worker] job %d abandoned: %s", job_id, exc)
        except (ParamError, ValidationError, UnknownDataset, ModelNotFound, JobFieldError,
                SecretUnreadable) as exc:
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a job's failure must not kill the worker
            log.exception("[Worker] job %d failed", job_id)
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
        finally:
            self.current_job = None

    def _data_progress(self, job_id: int, dataset: str):
        """The progress callback of a data fetch: the job shows a running `data_fetch`
        event (the "fetching data" phase) with its bytes."""
        logged = [0.0]

        def report(done: int, total: int | None) -> None:
            if time.monotonic() - logged[0] >= 5 or done == total:  # a line every 5 s
                logged[0] = time.monotonic()
                log.info("[Worker] job %d: fetching data for %s: %d of %s bytes", job_id,
                         dataset, done, "?" if total is None else total)
            record_data_fetch(self.factory, job_id, self.id, {
                "kind": "data_fetch", "state": "running", "dataset": dataset,
                "bytes_done": done, "bytes_total": total, "at": utcnow().isoformat()},
                self.settings.lease_seconds)
        return report

    def _prefetch_next(self, current: str) -> None:
        """While a job runs, bring the next queued job's model back to the GPU if it is
        offloaded here and fits (see ModelManager.prefetch)."""
        try:
            following = next_queued_model(self.factory, self.manager.loaded(),
                                          self.settings.affinity_seconds,
                                          Capacity(self.labels, len(self.gpus)))
            if following and following != current:
                self.manager.prefetch(following)
        except Exception:  # noqa: BLE001 - prefetching is an optimisation, never an error
            log.exception("[Worker] prefetch failed")

    def _publish_quietly(self) -> None:
        try:
            self.publish_status()
        except Exception:  # noqa: BLE001 - the job's outcome matters more than the status
            log.exception("[Worker] publishing the model manager status failed")

    def _fail(self, job_id: int, error: str) -> None:
        log.warning("[Worker] job %d failed: %s", job_id, error)
        self._publish_quietly()
        try:
            events = self.manager.events_since(getattr(self, "_job_events_from", 0))
            finish_job(self.factory, job_id, self.id, JobState.FAILED, error=error,
                       events=[e.as_dict() for e in events])
        except LeaseLost as exc:
            log.warning("[Worker] %s", exc)

    def wait_for_work(self) -> None:
        """Sleep until new work is announced (PostgreSQL) or the poll interval passed
        (SQLite); on PostgreSQL wake up, too, when a running job's lease expires."""
        timeout = self.settings.listen_timeout
        if self.waiter.listening:
            expiry = seconds_to_next_expiry(self.factory)
            if expiry is not None:
                timeout = min(timeout, expiry + 0.05)
        self.waiter.wait(self.settings.poll_interval, timeout, self.stopping)

    def run_forever(self) -> None:
        self.start()
        try:
            while not self.stopping.is_set():
                self.waiter.mark()
                if not self.run_once():
                    self.wait_for_work()
        finally:
            self.waiter.close()
            self.manager.stop_monitor()
            self.manager.release_all()
            worker_heartbeat(self.factory, self.id, state="stopped")
            log.info("[Worker] %s stopped", self.id)

    def stop(self) -> None:
        self.stopping.set()


def _choose_gpu(settings: Settings) -> str | None:
    """Without CUDA_VISIBLE_DEVICES on a machine with several GPUs, take the one with
    the most free memory that no live worker of this database holds."""
    import re

    from backend.db import utcnow
    from backend.jobs import list_workers
    from backend.memory.gpu import pick_free_gpu, visible_gpu_count
    from backend.scheduling import is_alive

    if settings.cuda_visible_devices is not None or visible_gpu_count(None) < 2:
        return None
    now = utcnow()
    taken = {m.group(1) for w in list_workers(session_factory(settings.database_url))
             if is_alive(w, now, settings.lease_seconds)
             and (m := re.match(r"cuda:(\d+)", w.device))}
    choice = pick_free_gpu(taken)
    if choice is not None:
        select_cuda_device(choice)
        log.info("[Worker] chose GPU %s (most free memory; taken by others: %s)", choice,
                 ", ".join(sorted(taken)) or "none")
    return choice


def warm_up() -> None:
    """Import the heavy libraries once at start rather than inside the first job.

    transformers imports its loading and generation machinery lazily, on the
    first from_pretrained (over a second on a small CPU). `gc.freeze()` then
    moves everything imported so far out of the collector's view, so the full
    collection that verifies a model release does not walk every module.
    """
    import gc

    import torch  # noqa: F401
    import transformers.generation  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    gc.collect()
    gc.freeze()


def detect_gpus(settings: Settings) -> list[dict[str, Any]]:
    """This worker's GPUs (index, name, total_bytes, free_bytes), read with NVML, limited
    to CUDA_VISIBLE_DEVICES; or the pretend GPUs of LBS_SIMULATED_GPU_MEMORY."""
    from backend.memory.gpu import gpu_inventory

    visible = settings.cuda_visible_devices
    indices = None
    if visible is not None:
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        if all(p.lstrip("-").isdigit() for p in parts):  # not GPU UUIDs
            indices = [int(p) for p in parts if int(p) >= 0]
    if settings.simulated_gpu_memory:
        pretend = [{"index": i, "name": "simulated GPU (LBS_SIMULATED_GPU_MEMORY)",
                    "total_bytes": size, "free_bytes": size, "simulated": True}
                   for i, size in enumerate(settings.simulated_gpu_memory)]
        return [g for g in pretend if indices is None or g["index"] in indices]
    return gpu_inventory(indices)


def _describe_device(settings: Settings, gpus: list[dict[str, Any]]) -> str:
    import torch

    if torch.cuda.is_available():
        visible = settings.cuda_visible_devices
        name = torch.cuda.get_device_name(0)
        return f"cuda:{visible or 0} ({name})"
    if gpus and gpus[0].get("simulated"):
        return f"cpu (simulated GPUs {','.join(str(g['index']) for g in gpus)})"
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.worker",
                                     description="Run one LLM Bench Shower worker.")
    parser.add_argument("--id", help="worker id (default: host-pid-random)")
    parser.add_argument("--gpus", metavar="0,1",
                        help="the GPUs this worker holds (sets CUDA_VISIBLE_DEVICES); a job "
                             "with num_gpus = 2 needs a worker holding two")
    args = parser.parse_args(argv)
    settings = load_settings_or_report()
    if settings is None:
        return 2
    setup_logging(settings.log_level)
    # Both must happen before torch initialises CUDA, i.e. before its first import.
    if args.gpus is not None:
        if not all(p.strip().isdigit() for p in args.gpus.split(",")):
            print(f"--gpus {args.gpus!r}: give GPU indices such as 0,1", file=sys.stderr)
            return 2
        select_cuda_device(args.gpus)
        settings = dataclasses.replace(settings, cuda_visible_devices=args.gpus)
    else:
        choice = _choose_gpu(settings)
        if choice is not None:
            settings = dataclasses.replace(settings, cuda_visible_devices=choice)
    alloc = apply_allocator_settings(settings)
    if alloc:
        log.info("[Worker] PYTORCH_CUDA_ALLOC_CONF=%s", alloc)
    warm_up()
    worker = Worker(settings, worker_id=args.id)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    worker.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
