"""A throwaway PostgreSQL server for the tests: initdb into a temporary folder, start
it on a free loopback port (its socket in the same folder), one database per test.

initdb refuses to run as root, so as root every server command runs as the
`postgres` user (Debian's package creates it) through `runuser`.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_bin_dir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None when PostgreSQL is absent."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """`start()`, `create_database()` -> a SQLAlchemy URL, `stop()`. Raises RuntimeError
    (with the reason) when no server can be started here."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lbs-pg-"))
        self.data = self.root / "data"
        self._count = 0
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run "
                                   "PostgreSQL as (initdb refuses root)") from None
            shutil.chown(self.root, "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self._as_user, *args], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed:\n{proc.stdout}\n{proc.stderr}")

    TEST_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    """A test server holds nothing worth keeping after a crash."""

    def start(self, options: str = TEST_OPTIONS) -> PostgresServer:
        """initdb and start; `options` are extra server settings (`-c name=value …`)."""
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "--auth=trust",
                  "-U", "postgres", "-E", "UTF8", "--no-sync", "--locale=C")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   f"-c max_connections=300 {options}")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
        return self

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self, prefix: str = "lbs_test") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        self._count += 1
        name = f"{prefix}_{self._count}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self._as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data),
                            "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
