"""A throwaway single-node Slurm for the tests, from Debian's packages (slurmctld, slurmd,
munge): munged, slurmctld and slurmd started in a temporary folder with their own key,
ports, state and logs, the node declaring two pretend GPUs (gres `gpu` on two device
files that are not GPUs: Slurm counts and hands them out, and nothing reads them).

Clients (sbatch, squeue, scancel) find it through `SLURM_CONF` in `env`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """`start()` -> self, `env` for the clients, `stop()`. Raises RuntimeError (with the
    reason) when no Slurm can be started here."""

    def __init__(self):
        missing = [b for b in BINARIES if shutil.which(b) is None
                   and not Path("/usr/sbin", b).is_file()]
        if missing:
            raise RuntimeError(f"not installed: {', '.join(missing)} "
                               "(apt-get install slurmctld slurmd slurm-client munge)")
        if os.geteuid() != 0:
            raise RuntimeError("slurmd needs root to start jobs as their user")
        self.root = Path(tempfile.mkdtemp(prefix="lbs-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _daemon(self, *args: str) -> None:
        path = shutil.which(args[0]) or f"/usr/sbin/{args[0]}"
        proc = subprocess.run([path, *args[1:]], capture_output=True, text=True,
                              env=self.env, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stderr.strip() or proc.stdout}")

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        r = self.root
        (r / "munge.key").write_bytes(os.urandom(1024))
        (r / "munge.key").chmod(0o600)
        self._daemon("munged", "--force", f"--socket={r}/munge.sock",
                     f"--key-file={r}/munge.key", f"--pid-file={r}/munged.pid",
                     f"--log-file={r}/munged.log", f"--seed-file={r}/munged.seed")
        for name in ("state", "spool"):
            (r / name).mkdir()
        for i in range(2):
            (r / f"gpu{i}").touch()
        node = socket.gethostname().split(".")[0]
        self.conf.write_text(f"""ClusterName=lbstest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.sock
CryptoType=crypto/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 Gres=gpu:2
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "gres.conf").write_text(f"AutoDetect=off\nNodeName={node} Name=gpu "
                                     f"File={r}/gpu[0-1]\n")
        self._daemon("slurmctld", "-c", "-f", str(self.conf))
        self._daemon("slurmd", "-f", str(self.conf))
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True,
                                 text=True, env=self.env).stdout.strip()
            if out == "idle":
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node is {out or 'unknown'} after {timeout:.0f} s; "
                                   f"see {r}/slurmctld.log and {r}/slurmd.log")
            time.sleep(0.5)

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / f"{name}.pid"
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[SlurmCluster]:
    """A started SlurmCluster for a fixture, stopped afterwards; the test is skipped with
    the reason where none can start here. One at a time on the machine (a file lock):
    two test processes each starting a cluster at once made one's jobs fail."""
    import fcntl

    import pytest

    with open(Path(tempfile.gettempdir()) / "lbs-test-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cluster = SlurmCluster().start()
        except RuntimeError as exc:
            pytest.skip(f"cannot start a single-node Slurm here: {exc}")
        try:
            yield cluster
        finally:
            cluster.stop()
