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
