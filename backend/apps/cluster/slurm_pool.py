"""Workers placed by Slurm: each placement is one `sbatch` job array, one worker per
array task, each holding its GPUs (`--gpus-per-task`) in its partition for at most its
time limit.

A worker stops `STOP_MARGIN_S` before its allocation ends (`lbs worker --max-runtime`),
between two samples, giving its job back to the queue first, and exits once it has
found nothing to run for its idle time (`--idle-exit`), which ends its array task and
frees its GPUs. The script carries no secret: the database URL and the other settings
travel in the job's environment (sbatch's `--export=ALL`, the default), taken from the
environment of the command that submits it.
"""

from __future__ import annotations

import getpass
import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from backend.queue.cluster import PoolShape

log = logging.getLogger(__name__)

STOP_MARGIN_S = 120
"""How long before its time limit a worker stops (its job given back): Slurm's
SIGTERM at the limit comes with only KillWait (30 s by default) before SIGKILL."""
HELD_STATES = {"PENDING", "CONFIGURING", "RUNNING", "RESIZING", "SUSPENDED", "REQUEUED"}
"""squeue states of an array task that holds (or will hold) its place."""


def worker_command() -> str:
    """`lbs` beside this interpreter (clusters share the install's file system), or
    this interpreter with `-m backend.apps.lbs` where no `lbs` is installed."""
    script = Path(sys.executable).parent / "lbs"
    return shlex.quote(str(script)) if script.is_file() else \
        f"{shlex.quote(sys.executable)} -m backend.apps.lbs"


@dataclass(frozen=True)
class SlurmOptions:
    """What each array task asks of Slurm: `partition` (None: the default one), `gpus`
    per task (from the pool), `cpus` per task, `time_minutes` (its time limit),
    `log_dir` for the tasks' output, and `extra` #SBATCH lines (`--account=…`)."""

    partition: str | None = None
    cpus: int = 4
    time_minutes: int = 240
    log_dir: Path = Path(".")
    extra: tuple[str, ...] = ()
    command: str = ""
    """How the nodes run `lbs` (default: `worker_command()`)."""


def render_script(pool: PoolShape, options: SlurmOptions, count: int, labels: str,
                  idle_exit_s: float | None) -> str:
    """The sbatch script of `count` workers of `pool`, each with the worker labels
    `labels` (LBS_WORKER_LABELS) and the idle exit `idle_exit_s` (None: none)."""
    runtime = max(60, options.time_minutes * 60 - STOP_MARGIN_S)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name(pool)}",
             f"#SBATCH --array=0-{count - 1}", "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={options.cpus}",
             f"#SBATCH --time={options.time_minutes}",
             f"#SBATCH --output={options.log_dir.absolute() / 'lbs-worker-%A_%a.log'}"]
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    if pool.gpus:
        lines.append(f"#SBATCH --gpus-per-task={pool.gpus}")
    lines += [f"#SBATCH {line}" for line in options.extra]
    worker = [options.command or worker_command(), "worker",
              "--id", f'"{pool.name}-${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"',
              "--max-runtime", str(runtime)]
    if idle_exit_s is not None:
        worker += ["--idle-exit", f"{idle_exit_s:g}"]
    lines += ["", "# one LLM Bench Shower worker per array task; it gives its job back "
              f"{STOP_MARGIN_S} s before the time limit",
              f"export LBS_WORKER_LABELS={shlex.quote(labels)}",
              "exec " + " ".join(worker), ""]
    return "\n".join(lines)


def job_name(pool: PoolShape) -> str:
    """The Slurm job name of the pool's workers."""
    return f"lbs-{pool.name}"


class SlurmPool:
    """A `WorkerEngine` on Slurm (see controller.py): `place` submits a job array with
    `sbatch`, `placed` counts the pool's tasks still pending or running with `squeue`, `close`
    cancels them with `scancel` (each worker gives its job back on the SIGTERM)."""

    name = "slurm"

    def __init__(self, pool: PoolShape, options: SlurmOptions, env: dict[str, str], *,
                 labels: str, idle_exit_s: float | None):
        self.pool, self.options, self.env = pool, options, env
        self.labels, self.idle_exit_s = labels, idle_exit_s
        self.job_name = job_name(pool)
        self.user = getpass.getuser()

    def _run(self, *args: str, script: str | None = None) -> str:
        proc = subprocess.run(args, input=script, capture_output=True, text=True,
                              env=self.env, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def place(self, count: int) -> None:
        script = render_script(self.pool, self.options, count, self.labels, self.idle_exit_s)
        job_id = self._run("sbatch", "--parsable", script=script).strip().split(";")[0]
        log.info("[Cluster] submitted Slurm job array %s: %d worker(s) of %d GPU(s)", job_id,
                 count, self.pool.gpus)

    def placed(self) -> int:
        """The pool's array tasks pending or running (this user's jobs of the pool's job
        name: a controller started again counts the workers the last one placed)."""
        out = self._run("squeue", "--noheader", "--array", f"--user={self.user}",
                        f"--name={self.job_name}", "--format=%F %T")
        held: dict[str, int] = {}
        for line in out.splitlines():
            array_id, state = line.split()
            if state in HELD_STATES:
                held[array_id] = held.get(array_id, 0) + 1
        return sum(held.values())

    def close(self) -> None:
        self._run("scancel", f"--user={self.user}", f"--name={self.job_name}")
        log.info("[Cluster] cancelled the Slurm jobs %s (each worker gives its job back)",
                 self.job_name)
