"""The run's own check for processes the tests left running: it must find a leaked
worker, and must not count the helpers Python keeps for the test process itself."""

import multiprocessing.resource_tracker as resource_tracker
import subprocess
import sys

from tests.conftest import _left_running


def test_leaked_child_is_found_and_the_own_resource_tracker_is_not():
    resource_tracker.ensure_running()  # what a test using shared memory or spawn starts
    tracker = resource_tracker._resource_tracker._pid
    leaked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pids = {proc.pid for proc in _left_running()}
        assert leaked.pid in pids
        assert tracker not in pids
    finally:
        leaked.kill()
        leaked.wait()


def test_an_orphan_of_the_run_is_found(tmp_path):
    """A process started by the run whose parent died (a worker that outlived its
    server) is found though it is no descendant of this process."""
    import os
    import time

    pid_file = tmp_path / "pid"
    code = ("import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid))")
    subprocess.run([sys.executable, "-c", code, str(pid_file)], check=True, env=os.environ)
    orphan = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 10
        while orphan not in {p.pid for p in _left_running()}:
            assert time.monotonic() < deadline, "the orphan was not found"
            time.sleep(0.2)
    finally:
        os.kill(orphan, 9)
