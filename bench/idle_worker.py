"""CPU an idle worker uses on SQLite: this checkout's worker against a baseline
checkout's (a git ref), measured in the same run, alternating.

    .venv/bin/python bench/idle_worker.py --baseline REF [--seconds 30] [--rounds 2]

Each round starts one worker per checkout (`python -m backend.apps.worker`, CPU
only, its own fresh SQLite data folder, an empty queue), waits until it has
registered and settled, then reads its CPU time (user + system, psutil) over
`--seconds` and prints it as a share of one core; the baseline's is read over the
same seconds, side by side, so load from other processes weighs on both alike.
The baseline checkout is `git archive REF`, run with the same interpreter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SETTLE_S = 20.0
"""After registration: imports, the first status and the lm-eval index settle first."""


def _checkout(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _start(code: Path, data: Path) -> subprocess.Popen:
    env = {**os.environ, "LBS_DATA_DIR": str(data), "LBS_ENV_FILE": str(data / "no.env"),
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "backend.apps.worker"], cwd=code, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(data / "worker.log", "w"))


def _registered(data: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " started on " in (data / "worker.log").read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise RuntimeError(f"no worker started:\n{(data / 'worker.log').read_text()[-2000:]}")


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git ref of the baseline")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = _checkout(args.baseline, Path(tmp) / "baseline")
        shares: dict[str, list[float]] = {"baseline": [], "this checkout": []}
        for rnd in range(args.rounds):
            procs = {}
            for name, code in (("baseline", base), ("this checkout", ROOT)):
                data = Path(tmp) / f"data-{name.replace(' ', '-')}-{rnd}"
                data.mkdir()
                procs[name] = (_start(code, data), data)
            try:
                for _proc, data in procs.values():
                    _registered(data)
                time.sleep(SETTLE_S)
                watched = {n: psutil.Process(p.pid) for n, (p, _) in procs.items()}
                before = {n: _cpu(p) for n, p in watched.items()}
                started = time.monotonic()
                time.sleep(args.seconds)
                wall = time.monotonic() - started
                for name, proc in watched.items():
                    shares[name].append(100 * (_cpu(proc) - before[name]) / wall)
            finally:
                for proc, _ in procs.values():
                    proc.terminate()
                    proc.wait(30)
            print(f"round {rnd + 1}: " + ", ".join(f"{n} {v[-1]:.2f}% of a core"
                                                   for n, v in shares.items()))
    base_med = statistics.median(shares["baseline"])
    ours_med = statistics.median(shares["this checkout"])
    print(f"idle worker, median of {args.rounds} x {args.seconds:g} s: baseline "
          f"({args.baseline}) {base_med:.2f}% of a core, this checkout {ours_med:.2f}% "
          f"(ratio {ours_med / base_med:.2f})" if base_med else "baseline used no CPU")


if __name__ == "__main__":
    main()
