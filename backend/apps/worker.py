"""The worker process: claims jobs from the database and runs them, one at a time.

`lbs worker` runs one worker alone (the server starts its own
with `lbs serve`; point LBS_DATABASE_URL at a shared PostgreSQL
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
from sqlalchemy.exc import SQLAlchemyError

from backend.common.config import (
    Settings,
    apply_allocator_settings,
    load_settings_or_report,
    select_cuda_device,
)
from backend.common.logs import setup_logging
from backend.engine.contracts import ParamError
from backend.engine.plugins import load_plugins
from backend.queue.control import (
    complete_command,
    pending_commands,
    prune_commands,
    publish_status,
    stored_commands,
)
from backend.queue.db import JobState, session_factory, utcnow
from backend.queue.jobs import (
    DEAD_WORKER_RETENTION,
    LeaseLost,
    claim_job,
    finish_job,
    give_back_job,
    mark_lost_workers,
    next_queued_model,
    prune_workers,
    record_manifest,
    record_phase,
    record_sample,
    register_worker,
    renew_lease,
    requeue_job,
    seconds_to_next_expiry,
    set_gpu_reservation,
    set_total,
    stored_samples,
    worker_heartbeat,
)
from backend.queue.notify import WorkWaiter
from backend.queue.scheduling import Capacity

log = logging.getLogger(__name__)

EXIT_CUDA_ERROR = 3
"""Exit status of a worker whose CUDA context broke; the server's pool starts a fresh one."""
PRUNE_EVERY_S = 3600.0
"""How often the heartbeat deletes old rows (jobs.prune_workers, control.prune_commands)."""


class _DbSink:
    """SampleSink that writes each result to the database as it comes, and stops the
    loop when the job is cancelled, the worker is stopping, or the job timed out."""

    def __init__(self, worker: Worker, job_id: int, timeout_s: float | None = None,
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
        record_phase(self.worker.factory, self.job_id, self.worker.id, ended,
                     self.worker.settings.lease_seconds)
        return True

    def stored(self) -> dict[int, tuple[dict, float]]:
        done = stored_samples(self.worker.factory, self.job_id)
        if done:
            log.info("[Worker] job %d resumes after %d stored samples", self.job_id, len(done))
        return done

    def set_total(self, total: int) -> None:
        set_total(self.worker.factory, self.job_id, self.worker.id, total)

    def set_manifest(self, manifest: dict[str, Any]) -> None:
        self.end_download("done")  # the manifest comes once the model has loaded
        record_manifest(self.worker.factory, self.job_id, self.worker.id, manifest)

    def write(self, record: Any) -> bool:
        values = {k: getattr(record, k) for k in (
            "idx", "prompt", "prompt_tokens", "prediction", "score", "latency_s",
            "output_tokens", "fields", "peak_rss_bytes", "peak_own_rss_bytes", "peak_gpu_bytes",
            "error")}
        cancel = record_sample(self.worker.factory, self.job_id, self.worker.id,
                               self.worker.settings.lease_seconds, values)
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


class Worker:
    """One worker: a model manager, a heartbeat thread and the claim-run loop."""

    def __init__(self, settings: Settings, worker_id: str | None = None,
                 device: str | None = None):
        from backend.engine.memory.entries import ManagerConfig
        from backend.engine.memory.manager import ModelManager

        self.settings = settings
        load_plugins(list(settings.plugin_dirs))
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
        self._job_lock = threading.Lock()  # current_job and cancel_seen change together
        self.cuda_broken: str | None = None
        """The CUDA error that made this process's context unusable (then it exits)."""
        self._heartbeat: threading.Thread | None = None
        self._control: threading.Thread | None = None

    # --- heartbeat --------------------------------------------------------------

    def capacity(self) -> Capacity:
        """What this worker can run now; GPU memory is read afresh (see `free_gpu_bytes`)."""
        return Capacity(labels=self.labels, gpu_count=len(self.gpus),
                        free_gpu_bytes=self.free_gpu_bytes() if self.gpus else None,
                        host=socket.gethostname(),
                        gpu_indices=tuple(int(g["index"]) for g in self.gpus))

    def free_gpu_bytes(self) -> tuple[int, ...]:
        """GPU memory a job may use here now, per GPU in CUDA order: its free memory,
        plus on the first GPU what this worker's idle models hold there (the model
        manager makes room by offloading them; a movable model lives on the first GPU);
        under LBS_GPU_MEMORY_LIMIT never more than the process cap (limit x total) less
        what this worker's models in use hold there, since the cap counts every byte
        this process allocates. Also notes each GPU's figure as `available_bytes` in
        `self.gpus`, which the heartbeat stores."""
        self.gpus = detect_gpus(self.settings) or self.gpus
        fraction = self.settings.gpu_memory_limit
        free = [int(g["free_bytes"]) for g in self.gpus]
        caps = [int(g["total_bytes"] * fraction) if fraction > 0 else None for g in self.gpus]
        if self.manager.has_gpu and free:  # lock-free: never waits on a model move
            idle, held = self.manager.idle_gpu_bytes(), self.manager.gpu_bytes()
            free[0] += idle
            if caps[0] is not None:
                caps[0] -= held - idle
        free = [f if cap is None else max(0, min(f, cap))
                for f, cap in zip(free, caps, strict=True)]
        for gpu, available in zip(self.gpus, free, strict=True):
            gpu["available_bytes"] = available
        return tuple(free)

    def _beat(self) -> None:
        interval = max(0.2, min(5.0, self.settings.lease_seconds / 4))
        last_sweep, last_prune = 0.0, float("-inf")  # prune once at start, then hourly
        while not self.stopping.wait(interval):
            try:
                job_id = self.current_job
                if job_id is not None:
                    self.renew(job_id)
                if self.gpus:
                    free = self.free_gpu_bytes()
                    known = worker_heartbeat(self.factory, self.id, gpus=self.gpus,
                                             gpu_free_bytes=sum(free))
                else:
                    known = worker_heartbeat(self.factory, self.id)
                if not known:  # pruned while this process slept (a suspended machine)
                    log.warning("[Worker] %s had no row (pruned); registering again", self.id)
                    self._register(self.current_job)
                    self.publish_status()
                if time.monotonic() - last_sweep >= 10.0:
                    last_sweep = time.monotonic()
                    for lost in mark_lost_workers(self.factory, self.settings.lease_seconds):
                        log.warning("[Worker] worker %s stopped heartbeating: marked lost; "
                                    "its job goes back to the queue when its lease expires",
                                    lost)
                if time.monotonic() - last_prune >= PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    self._prune()
            except Exception:  # noqa: BLE001 - the heartbeat must outlive a busy database
                log.exception("[Worker] heartbeat failed; retrying")

    def start_job_watch(self, job_id: int) -> None:
        """Make `job_id` the job whose lease the heartbeat renews and whose cancel
        request (or lost lease) stops the evaluation loop."""
        with self._job_lock:
            self.current_job = job_id
            self.cancel_seen.clear()

    def renew(self, job_id: int) -> None:
        """Renew `job_id`'s lease. A cancel request or a lost lease stops the loop, but
        only while `job_id` is still the current job: the heartbeat may have read the
        previous job just before it finished, and its lost lease is no news for the next."""
        try:
            stop = renew_lease(self.factory, job_id, self.id, self.settings.lease_seconds)
        except LeaseLost as exc:
            log.warning("[Worker] %s", exc)
            stop = True
        if stop:
            with self._job_lock:
                if self.current_job == job_id:
                    self.cancel_seen.set()

    def start(self) -> None:
        if self.gpus and not self.gpus[0].get("simulated"):
            from backend.engine.memory.gpu import take_device_baseline

            # before any model loads: what the GPUs hold without this worker
            take_device_baseline([g["index"] for g in self.gpus],
                                 visible=self.settings.cuda_visible_devices)
        self._register()
        self.publish_status()
        self.apply_stored_settings()
        self.manager.start_monitor()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._heartbeat.start()
        self._control = threading.Thread(target=self._serve_commands, name="control",
                                         daemon=True)
        self._control.start()
        log.info("[Worker] %s started on %s", self.id, self.device)

    def _register(self, current_job_id: int | None = None) -> None:
        free = self.free_gpu_bytes() if self.gpus else None
        register_worker(self.factory, self.id, socket.gethostname(), os.getpid(), self.device,
                        labels=self.labels, gpus=self.gpus,
                        gpu_free_bytes=sum(free) if free is not None else None,
                        current_job_id=current_job_id)

    def _prune(self) -> None:
        """Delete rows of workers dead for DEAD_WORKER_RETENTION, and commands as old."""
        gone = prune_workers(self.factory)
        commands = prune_commands(self.factory, DEAD_WORKER_RETENTION)
        if gone or commands:
            log.info("[Worker] pruned %d worker row(s) dead for %d days (%s) and %d old "
                     "control command(s)", len(gone), DEAD_WORKER_RETENTION.days,
                     ", ".join(gone[:5]) + (" ..." if len(gone) > 5 else ""), commands)

    # --- model manager status and commands ------------------------------------------

    def apply_stored_settings(self) -> None:
        """Apply the operator's run-time settings (POST /api/gpu/timeout, /api/v1/memory/
        limit), stored in the database. Called after the first status is published: a
        change made while this worker starts is then either read here or sent to it."""
        for command, args in stored_commands(self.factory):
            result, error = self.apply_command(command, args)
            log.info("[Worker] stored setting %s %s: %s", command, args, error or result)
        self.publish_status()

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
        from backend.engine.memory.entries import MemoryLimitError, ModelBusy, UnknownModel

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
                     num_gpus=job.num_gpus, memory_bytes=job.memory_bytes,
                     shard=(job.shard_index, job.shard_count) if job.parent_id else None)
        return True

    def run_job(self, job_id: int, model: str, dataset: str, params: dict[str, Any],
                timeout_s: float | None = None, api: dict[str, Any] | None = None,
                api_key_encrypted: str | None = None, num_gpus: int = 1,
                memory_bytes: int | None = None,
                shard: tuple[int, int] | None = None) -> None:
        from backend.common.secrets_box import SecretUnreadable, decrypt
        from backend.datasets.registry import UnknownDataset
        from backend.engine.answering import is_cuda_failure
        from backend.engine.contracts import JobFieldError, ModelNotFound, Stopped
        from backend.engine.evaluation import EvalOutcome, run_evaluation
        from backend.engine.preparation import prepare

        self.start_job_watch(job_id)
        self._job_events_from = self.manager.event_count
        log.info("[Worker] job %d: %s on %s", job_id, dataset, model)
        if self.manager.has_gpu:
            used = [str(g["index"]) for g in self.gpus[:max(1, num_gpus)]]
            threading.Thread(target=self._after_load, args=(job_id, model, memory_bytes, used),
                             name="prefetch", daemon=True).start()
        try:
            api_key = decrypt(self.settings, api_key_encrypted) if api_key_encrypted else None
            prepared = prepare(model, dataset, params, self.settings,
                               api=api or None,  # the runner validates its options
                               api_key=api_key, fetch_data=True,
                               data_progress=self._data_progress(job_id, dataset))
            for fetched in prepared.dataset.data_access.fetched:
                record_phase(self.factory, job_id, self.id, {
                    "kind": "data_fetch", "state": "done", "dataset": dataset,
                    "repo_id": fetched["repo_id"], "bytes_done": fetched["bytes"],
                    "bytes_total": fetched["bytes"], "files": fetched["files"],
                    "seconds": fetched["seconds"], "at": utcnow().isoformat()})
            prepared.num_gpus = num_gpus
            prepared.shard = shard
            sink = _DbSink(self, job_id, timeout_s, self._start_download(job_id, prepared))
            prepared.should_stop = sink.should_stop
            try:
                outcome = run_evaluation(
                    prepared, self.manager, self.settings, sink,
                    keep_on_gpu=lambda: next_queued_model(
                        self.factory, [model], self.settings.affinity_seconds,
                        Capacity(self.labels, len(self.gpus))) == model)
            except OSError as exc:  # the hub unreachable, the model not on it…
                if not sink.end_download("failed"):
                    raise
                self._fail(job_id, f"could not download hub model {model!r} "
                           f"({type(exc).__name__}: {exc}); check the network (or "
                           f"HF_ENDPOINT), or download it where there is one: "
                           f"`hf download {model}` (then copy the Hugging Face cache)")
                return
            except Stopped:  # a runner stopped waiting (an API request in flight)
                outcome = EvalOutcome(scores=[], memory=[], stopped=True, events=[
                    e.as_dict() for e in self.manager.events_since(self._job_events_from)])
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
            if is_cuda_failure(exc):
                self._give_back_after_cuda_error(job_id, exc)
                return
            log.exception("[Worker] job %d failed", job_id)
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
        finally:
            self.current_job = None
            self._drop_reservation()

    def _drop_reservation(self) -> None:
        """The job ended: what it holds is gone or shows in NVML (its cached model)."""
        try:
            set_gpu_reservation(self.factory, self.id, None)
        except Exception:  # noqa: BLE001 - the row is rewritten at the next claim anyway
            log.exception("[Worker] could not drop this worker's GPU reservation")

    def _start_download(self, job_id: int, job: Any) -> dict[str, Any] | None:
        """A hub model not in the cache (LBS_ALLOW_DOWNLOAD=1) is downloaded by its load:
        the job shows the "downloading model" phase until the model has loaded (the
        sink ends it). The running event, or None when nothing is downloaded."""
        spec = job.spec
        if spec.hub_id is None or spec.path is not None:
            return None
        log.info("[Worker] job %d: downloading %s from the Hugging Face hub", job_id,
                 spec.hub_id)
        event = {"kind": "model_download", "state": "running", "model": spec.hub_id,
                 "at": utcnow().isoformat()}
        record_phase(self.factory, job_id, self.id, event, self.settings.lease_seconds)
        return event

    def _data_progress(self, job_id: int, dataset: str):
        """The progress callback of a data fetch: the job shows a running `data_fetch`
        event (the "fetching data" phase) with its bytes."""
        logged = [0.0]

        def report(done: int, total: int | None) -> None:
            if time.monotonic() - logged[0] >= 5 or done == total:  # a line every 5 s
                logged[0] = time.monotonic()
                log.info("[Worker] job %d: fetching data for %s: %d of %s bytes", job_id,
                         dataset, done, "?" if total is None else total)
            record_phase(self.factory, job_id, self.id, {
                "kind": "data_fetch", "state": "running", "dataset": dataset,
                "bytes_done": done, "bytes_total": total, "at": utcnow().isoformat()},
                self.settings.lease_seconds)
        return report

    def _give_back_after_cuda_error(self, job_id: int, exc: BaseException) -> None:
        """After a CUDA error nothing more can run in this process: give the job back
        (counted as an attempt, see jobs.give_back_job) and stop, so that the server's
        pool starts a fresh worker with a fresh CUDA context."""
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.error("[Worker] job %d hit a CUDA error; this worker's CUDA context is unusable, "
                  "so it gives the job back and exits: %s", job_id, error, exc_info=exc)
        self.cuda_broken = error
        self.stopping.set()
        try:
            state = give_back_job(self.factory, job_id, self.id, error,
                                  self.settings.max_attempts)
            log.info("[Worker] job %d is %s", job_id, state.value)
        except LeaseLost as lost:
            log.warning("[Worker] %s", lost)

    def _after_load(self, job_id: int, current: str, job_bytes: int | None,
                    gpus: list[str]) -> None:
        """Once the running job's model has loaded (NVML shows its weights now), keep
        reserved on the job's `gpus` (NVML indices) only what the job still allocates
        (its estimate less its weights), for the other workers of this GPU; then
        prefetch the next job's model (`_prefetch_next`)."""
        try:
            while not self.manager.wait_loaded(current, 1.0):
                if self.current_job != job_id or self.stopping.is_set():
                    return  # the job ended (or its load failed) first
            if job_bytes and gpus and self.current_job == job_id:
                rest = max(0, job_bytes - self.manager.size_of(current))
                set_gpu_reservation(self.factory, self.id,
                                    {i: rest // len(gpus) for i in gpus})
        except Exception:  # noqa: BLE001 - the full reservation stays until the job ends
            log.exception("[Worker] could not lower this worker's GPU reservation")
        self._prefetch_next(job_id, current, job_bytes)

    def _prefetch_next(self, job_id: int, current: str, job_bytes: int | None) -> None:
        """While a job runs, bring the next queued job's model back to the GPU if it is
        offloaded here and fits (see ModelManager.prefetch). It waits for the running
        job's model to load first, and leaves room for what that job still allocates
        (its estimate less its weights)."""
        try:
            while not self.manager.wait_loaded(current, 1.0):
                if self.current_job != job_id or self.stopping.is_set():
                    return  # the job ended (or its load failed) first
            following = next_queued_model(self.factory, self.manager.loaded(),
                                          self.settings.affinity_seconds,
                                          Capacity(self.labels, len(self.gpus)))
            if following and following != current and self.current_job == job_id:
                reserve = max(0, (job_bytes or 0) - self.manager.size_of(current))
                self.manager.prefetch(following, reserve=reserve)
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

    def run_forever(self) -> int:
        """Claim and run jobs until stopped; the process's exit status (EXIT_CUDA_ERROR
        after a CUDA error, else 0). A database error while claiming is logged and
        retried with exponential backoff (0.5 s doubling to 30 s)."""
        self.start()
        failures = 0
        try:
            while not self.stopping.is_set():
                try:
                    self.waiter.mark()
                    ran = self.run_once()
                    if not ran:
                        self.wait_for_work()
                    failures = 0
                except SQLAlchemyError:
                    failures += 1
                    delay = min(30.0, 0.5 * 2 ** (failures - 1))
                    log.exception("[Worker] database error between jobs; retrying in %.1f s",
                                  delay)
                    self.stopping.wait(delay)
        finally:
            self.waiter.close()
            self.manager.stop_monitor()
            if self.cuda_broken is None:  # a broken context cannot free anything: exit does
                self.manager.release_all()
            try:
                worker_heartbeat(self.factory, self.id, state="stopped")
            except SQLAlchemyError:
                log.exception("[Worker] could not mark this worker stopped")
            log.info("[Worker] %s stopped", self.id)
        return EXIT_CUDA_ERROR if self.cuda_broken else 0

    def stop(self) -> None:
        self.stopping.set()


def _choose_gpu(settings: Settings) -> str | None:
    """Without CUDA_VISIBLE_DEVICES on a machine with several GPUs, take the one with
    the most free memory that no live worker on this host holds (every GPU of a
    worker that holds several; workers of other hosts sharing the database hold
    GPUs of their own machines)."""
    from backend.engine.memory.gpu import pick_free_gpu, visible_gpu_count
    from backend.queue.db import utcnow
    from backend.queue.jobs import list_workers
    from backend.queue.scheduling import is_alive

    if settings.cuda_visible_devices is not None or visible_gpu_count(None) < 2:
        return None
    now, host = utcnow(), socket.gethostname()
    taken = {str(g["index"]) for w in list_workers(session_factory(settings.database_url))
             if w.host == host and is_alive(w, now, settings.lease_seconds)
             for g in (w.gpus or []) if not g.get("simulated")}
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
    from backend.engine.memory.gpu import gpu_inventory

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
    return gpu_inventory(visible)


def _describe_device(settings: Settings, gpus: list[dict[str, Any]]) -> str:
    import torch

    if torch.cuda.is_available():
        visible = settings.cuda_visible_devices
        name = torch.cuda.get_device_name(0)
        return f"cuda:{visible or 0} ({name})"
    if gpus and gpus[0].get("simulated"):
        return f"cpu (simulated GPUs {','.join(str(g['index']) for g in gpus)})"
    return "cpu"


def die_with_parent(parent_pid: int) -> bool:
    """Have Linux send this process SIGTERM when its parent ends (PR_SET_PDEATHSIG),
    so a worker whose server was killed stops instead of claiming jobs as an orphan.
    False when the parent is already gone (the caller exits). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("[Worker] prctl(PR_SET_PDEATHSIG) failed (errno %d); this worker "
                        "outlives its server if that is killed", ctypes.get_errno())
    return os.getppid() == parent_pid  # it may have ended before prctl took effect


ORPHAN_GRACE_S = 10.0
"""How long a worker whose server died may take to stop between samples before it
exits anyway (its job's lease then expires and the job resumes elsewhere)."""


def watch_parent(parent_pid: int, stop: threading.Event, done: threading.Event,
                 grace: float = ORPHAN_GRACE_S, exit_now=os._exit,
                 every: float = 0.5) -> None:
    """Until `done` is set: once the process `parent_pid` is no longer this one's
    parent (the server died, even by SIGKILL), set `stop`, and exit if the worker has
    not finished `grace` seconds later. A thread of its own, so a main thread blocked in
    C (a database wait, a forward pass) cannot keep an orphan alive; the kernel's
    PR_SET_PDEATHSIG signal only reaches Python handlers between bytecodes. It watches
    until `done`, not until `stop`: that signal sets `stop` first, and a worker stuck
    after it must still end."""
    while not done.wait(every):
        if os.getppid() != parent_pid:
            log.warning("[Worker] the server (pid %d) is gone; stopping", parent_pid)
            stop.set()
            if not done.wait(grace):
                log.error("[Worker] still running %.0f s after the server died; exiting",
                          grace)
                exit_now(1)
            return


def main(argv: list[str] | None = None, prog: str = "python -m backend.apps.worker") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run one LLM Bench Shower worker: it takes jobs from the "
                               "queue (LBS_DATABASE_URL) and runs them.",
        epilog="example: lbs worker --gpus 0,1")
    parser.add_argument("--id", help="worker id (default: host-pid-random)")
    parser.add_argument("--gpus", metavar="0,1",
                        help="the GPUs this worker holds (sets CUDA_VISIBLE_DEVICES); a job "
                             "with num_gpus = 2 needs a worker holding two")
    parser.add_argument("--parent-pid", type=int, metavar="PID",
                        help="stop (SIGTERM) when the process PID ends; the server passes "
                             "its own")
    args = parser.parse_args(argv)
    if args.parent_pid is not None and not die_with_parent(args.parent_pid):
        return 0
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
    if args.parent_pid is not None:
        # Never `done`: the watch lasts as long as the process, its shutdown included
        # (the interpreter joins threads after main returns, and one may hang).
        threading.Thread(target=watch_parent,
                         args=(args.parent_pid, worker.stopping, threading.Event()),
                         name="parent-watch", daemon=True).start()
    return worker.run_forever()


if __name__ == "__main__":
    from backend.common.commands import moved

    moved("python -m backend.apps.worker", "lbs worker")
    sys.exit(main())
