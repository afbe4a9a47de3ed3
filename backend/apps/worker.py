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

from backend.apps import worker_gpus
from backend.apps.worker_commands import ManagerChannel
from backend.apps.worker_process import die_with_parent, warm_up, watch_parent, worker_arguments
from backend.apps.worker_sink import DbSink, data_progress
from backend.common.config import (
    Settings,
    apply_allocator_settings,
    load_settings_or_report,
    select_cuda_device,
)
from backend.common.logs import setup_logging
from backend.engine.contracts import ParamError
from backend.engine.plugins import load_plugins
from backend.queue.db import JobState, utcnow
from backend.queue.jobs import LeaseLost, Queue
from backend.queue.notify import CommitWatch, WorkWaiter
from backend.queue.scheduling import Capacity
from backend.queue.workers import DEAD_WORKER_RETENTION

log = logging.getLogger(__name__)

EXIT_CUDA_ERROR = 3
"""Exit status of a worker whose CUDA context broke; the server's pool starts a fresh one."""
PRUNE_EVERY_S = 3600.0
"""How often the heartbeat deletes old rows (Workers.prune, Commands.prune)."""


class Worker:
    """One worker: a model manager, a heartbeat thread and the claim-run loop."""

    def __init__(self, settings: Settings, worker_id: str | None = None,
                 device: str | None = None):
        from backend.engine.memory.entries import ManagerConfig
        from backend.engine.memory.manager import ModelManager

        self.settings = settings
        load_plugins(list(settings.plugin_dirs))
        self.queue = Queue.from_settings(settings)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.labels = tuple(dict.fromkeys((*settings.worker_labels, socket.gethostname(),
                                           self.id)))
        self.gpus = worker_gpus.detect_gpus(settings)
        self.device = device or worker_gpus.describe_device(settings, self.gpus)
        self.waiter = WorkWaiter(settings.database_url)
        self.manager = ModelManager(ManagerConfig.from_settings(settings))
        self.channel = ManagerChannel(self.id, self.device, self.manager, self.queue.commands,
                                      lambda: self.current_job,
                                      CommitWatch(settings.database_url).committed_since)
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
        """GPU memory a job may use here now, per GPU in CUDA order (see
        `worker_gpus.available_bytes`); notes each GPU's figure as `available_bytes`
        in `self.gpus`, which the heartbeat stores."""
        self.gpus = worker_gpus.detect_gpus(self.settings) or self.gpus
        return worker_gpus.available_bytes(self.gpus, self.settings.gpu_memory_limit,
                                           self.manager)

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
                    known = self.queue.workers.heartbeat(self.id, gpus=self.gpus,
                                                         gpu_free_bytes=sum(free))
                else:
                    known = self.queue.workers.heartbeat(self.id)
                if not known:  # pruned while this process slept (a suspended machine)
                    log.warning("[Worker] %s had no row (pruned); registering again", self.id)
                    self._register(self.current_job)
                    self.channel.publish_status()
                if time.monotonic() - last_sweep >= 10.0:
                    last_sweep = time.monotonic()
                    for lost in self.queue.workers.mark_lost():
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
            stop = self.queue.renew(job_id, self.id)
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
        self.channel.publish_status()
        self.channel.apply_stored_settings()
        self.manager.start_monitor()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._heartbeat.start()
        self._control = threading.Thread(target=self.channel.serve, args=(self.stopping,),
                                         name="control",
                                         daemon=True)
        self._control.start()
        log.info("[Worker] %s started on %s", self.id, self.device)

    def _register(self, current_job_id: int | None = None) -> None:
        free = self.free_gpu_bytes() if self.gpus else None
        self.queue.workers.register(self.id, socket.gethostname(), os.getpid(), self.device,
                                    labels=self.labels, gpus=self.gpus,
                                    gpu_free_bytes=sum(free) if free is not None else None,
                                    current_job_id=current_job_id)

    def _prune(self) -> None:
        """Delete rows of workers dead for DEAD_WORKER_RETENTION, and commands as old."""
        gone = self.queue.workers.prune()
        commands = self.queue.commands.prune(DEAD_WORKER_RETENTION)
        if gone or commands:
            log.info("[Worker] pruned %d worker row(s) dead for %d days (%s) and %d old "
                     "control command(s)", len(gone), DEAD_WORKER_RETENTION.days,
                     ", ".join(gone[:5]) + (" ..." if len(gone) > 5 else ""), commands)

    # --- jobs -------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue was empty."""
        job = self.queue.claim(self.id, prefer_models=self.manager.loaded(),
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
                               data_progress=data_progress(self.queue, self.id, job_id, dataset),
                               num_gpus=num_gpus, shard=shard)
            for fetched in prepared.dataset.data_access.fetched:
                self.queue.record_phase(job_id, self.id, {
                    "kind": "data_fetch", "state": "done", "dataset": dataset,
                    "repo_id": fetched["repo_id"], "bytes_done": fetched["bytes"],
                    "bytes_total": fetched["bytes"], "files": fetched["files"],
                    "seconds": fetched["seconds"], "at": utcnow().isoformat()},
                    renew=False)
            sink = DbSink(self, job_id, timeout_s, self._start_download(job_id, prepared))
            prepared = prepared.stopping_with(sink.should_stop)
            try:
                outcome = run_evaluation(
                    prepared, self.manager, self.settings, sink,
                    keep_on_gpu=lambda: self.queue.next_model(
                        [model], Capacity(self.labels, len(self.gpus))) == model)
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
                self.queue.requeue(job_id, self.id)
                log.info("[Worker] job %d given back to the queue", job_id)
                return
            state = JobState.CANCELLED if outcome.stopped else JobState.SUCCEEDED
            error = None
            if outcome.stopped and sink.timed_out and not self.cancel_seen.is_set():
                state = JobState.FAILED
                error = (f"timed out: ran longer than {timeout_s:g} s "
                         "(job timeout_s or LBS_JOB_TIMEOUT); the samples done are kept")
            self.queue.finish(job_id, self.id, state, scores=outcome.scores,
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
            if self._cancel_requested(job_id):
                # cancelled while it loaded: what the interrupted load raised is no failure
                log.info("[Worker] job %d cancelled (%s: %s on the way out)", job_id,
                         type(exc).__name__, exc)
                self._end_cancelled(job_id)
                return
            log.exception("[Worker] job %d failed", job_id)
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
        finally:
            self.current_job = None
            self._drop_reservation()

    def _drop_reservation(self) -> None:
        """The job ended: what it holds is gone or shows in NVML (its cached model)."""
        try:
            self.queue.workers.reserve(self.id, None)
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
        self.queue.record_phase(job_id, self.id, event)
        return event

    def _give_back_after_cuda_error(self, job_id: int, exc: BaseException) -> None:
        """After a CUDA error nothing more can run in this process: give the job back
        (counted as an attempt, see Queue.give_back) and stop, so that the server's
        pool starts a fresh worker with a fresh CUDA context."""
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.error("[Worker] job %d hit a CUDA error; this worker's CUDA context is unusable, "
                  "so it gives the job back and exits: %s", job_id, error, exc_info=exc)
        self.cuda_broken = error
        self.stopping.set()
        try:
            state = self.queue.give_back(job_id, self.id, error)
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
                self.queue.workers.reserve(self.id, {i: rest // len(gpus) for i in gpus})
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
            following = self.queue.next_model(self.manager.loaded(),
                                              Capacity(self.labels, len(self.gpus)))
            if following and following != current and self.current_job == job_id:
                reserve = max(0, (job_bytes or 0) - self.manager.size_of(current))
                self.manager.prefetch(following, reserve=reserve)
        except Exception:  # noqa: BLE001 - prefetching is an optimisation, never an error
            log.exception("[Worker] prefetch failed")

    def _publish_quietly(self) -> None:
        try:
            self.channel.publish_status()
        except Exception:  # noqa: BLE001 - the job's outcome matters more than the status
            log.exception("[Worker] publishing the model manager status failed")

    def _cancel_requested(self, job_id: int) -> bool:
        """Whether the job was cancelled, asking the queue if the heartbeat has not
        told yet (False once the job is no longer this worker's)."""
        if self.cancel_seen.is_set():
            return True
        try:
            return self.queue.renew(job_id, self.id)
        except LeaseLost:
            return False

    def _end_cancelled(self, job_id: int) -> None:
        self._end_unsuccessful(job_id, JobState.CANCELLED)

    def _fail(self, job_id: int, error: str) -> None:
        log.warning("[Worker] job %d failed: %s", job_id, error)
        self._end_unsuccessful(job_id, JobState.FAILED, error)

    def _end_unsuccessful(self, job_id: int, state: JobState, error: str | None = None) -> None:
        self._publish_quietly()
        try:
            events = self.manager.events_since(getattr(self, "_job_events_from", 0))
            self.queue.finish(job_id, self.id, state, error=error,
                              events=[e.as_dict() for e in events])
        except LeaseLost as exc:
            log.warning("[Worker] %s", exc)

    def wait_for_work(self, at_most: float | None = None) -> None:
        """Sleep until new work is announced (PostgreSQL) or the poll interval passed
        (SQLite); on PostgreSQL wake up, too, when a running job's lease expires. Never
        longer than `at_most` seconds (an idle exit due)."""
        timeout = self.settings.listen_timeout
        poll = self.settings.poll_interval
        if self.waiter.listening:
            expiry = self.queue.seconds_to_next_expiry()
            if expiry is not None:
                timeout = min(timeout, expiry + 0.05)
        if at_most is not None:
            timeout, poll = min(timeout, max(at_most, 0.05)), min(poll, max(at_most, 0.05))
        self.waiter.wait(poll, timeout, self.stopping)

    def _end_runtime(self, seconds: float) -> None:
        log.info("[Worker] %s reached its run time of %g s: stopping between two samples "
                 "and giving its job back", self.id, seconds)
        self.stopping.set()

    def run_forever(self, idle_exit_s: float | None = None,
                    max_runtime_s: float | None = None) -> int:
        """Claim and run jobs until stopped; the process's exit status (EXIT_CUDA_ERROR
        after a CUDA error, else 0). A database error while claiming is logged and
        retried with exponential backoff (0.5 s doubling to 30 s).

        A worker a cluster placed ends on its own: `idle_exit_s` after it last found
        nothing to run (so an empty queue holds no GPU), and `max_runtime_s` after it
        started (before its allocation ends), stopping between two samples and giving
        its job back to the queue first, as on SIGTERM."""
        self.start()
        failures = 0
        idle_since = time.monotonic()
        if max_runtime_s is not None:
            timer = threading.Timer(max_runtime_s, self._end_runtime, args=(max_runtime_s,))
            timer.daemon = True
            timer.start()
        try:
            while not self.stopping.is_set():
                try:
                    self.waiter.mark()
                    ran = self.run_once()
                    if ran:
                        idle_since = time.monotonic()
                    elif idle_exit_s is not None and \
                            time.monotonic() - idle_since >= idle_exit_s:
                        log.info("[Worker] %s idle for %.0f s: exiting (idle exit %g s)",
                                 self.id, time.monotonic() - idle_since, idle_exit_s)
                        break
                    else:
                        self.wait_for_work(None if idle_exit_s is None else
                                           idle_since + idle_exit_s - time.monotonic())
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
                self.queue.workers.heartbeat(self.id, state="stopped")
            except SQLAlchemyError:
                log.exception("[Worker] could not mark this worker stopped")
            log.info("[Worker] %s stopped", self.id)
        return EXIT_CUDA_ERROR if self.cuda_broken else 0

    def stop(self) -> None:
        self.stopping.set()


def main(argv: list[str] | None = None, prog: str = "python -m backend.apps.worker") -> int:
    args = worker_arguments(prog).parse_args(argv)
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
        choice = worker_gpus.choose_gpu(settings)
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
    return worker.run_forever(idle_exit_s=args.idle_exit, max_runtime_s=args.max_runtime)


if __name__ == "__main__":
    from backend.common.commands import moved

    moved("python -m backend.apps.worker", "lbs worker")
    sys.exit(main())
