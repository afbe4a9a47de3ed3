"""The worker process's life around its loop: its command line, heavy imports done
once at start, and an end when its server ends (PR_SET_PDEATHSIG, and a thread
watching the parent)."""

from __future__ import annotations

import argparse
import logging
import os
import threading

from backend.common import lifetime

log = logging.getLogger(__name__)


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


def die_with_parent(parent_pid: int) -> bool:
    """See `backend.common.lifetime.die_with_parent`: a worker whose server was killed
    stops instead of claiming jobs as an orphan."""
    return lifetime.die_with_parent(parent_pid, "[Worker]")


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


def worker_arguments(prog: str) -> argparse.ArgumentParser:
    """The command line of `lbs worker`."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Run one LLM Bench Shower worker: it takes jobs from the "
                               "queue (LBS_DATABASE_URL) and runs them.",
        epilog="example: lbs worker --gpus 0,1")
    parser.add_argument("--id", help="worker id (default: host-pid-random)")
    parser.add_argument("--gpus", metavar="0,1",
                        help="the GPUs this worker holds (sets CUDA_VISIBLE_DEVICES); a job "
                             "with num_gpus = 2 needs a worker holding two")
    parser.add_argument("--idle-exit", type=_seconds, metavar="SECONDS",
                        help="exit after finding nothing to run for this long (a worker a "
                             "cluster placed: an empty queue then holds no GPU)")
    parser.add_argument("--max-runtime", type=_seconds, metavar="SECONDS",
                        help="stop after running this long, giving the running job back to "
                             "the queue first (set it below a cluster allocation's time "
                             "limit)")
    parser.add_argument("--parent-pid", type=int, metavar="PID",
                        help="stop (SIGTERM) when the process PID ends; the server passes "
                             "its own")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value
