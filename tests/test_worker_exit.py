"""A worker placed by a cluster ends on its own: after an idle time (so an empty queue
holds no GPU) and when its allocation runs out (its job given back first)."""

from __future__ import annotations

import threading
import time

from backend.apps.worker import Worker
from backend.queue import jobs
from backend.queue.db import JobState
from tests.conftest import queue_on

SLOW_PLUGIN = '''
import time

from backend.datasets.base import CacheMode, Dataset, DatasetParams, Item
from backend.datasets.registry import register


class SlowParams(DatasetParams):
    items: int = 6
    seconds: float = 0.3


@register
class Slow(Dataset):
    """Each sample takes `seconds` to score: a job long enough to stop midway."""
    name = "slow_echo"
    description = "Echo a number back, slowly (test plugin)."
    cache_mode = CacheMode.CACHED
    Params = SlowParams

    def build_items(self, params, tokenizer):
        self.seconds = params.seconds
        return [Item(idx=i, prompt=tokenizer.render(f"Say {i}"), prompt_tokens=4,
                     max_new_tokens=1, reference=str(i), fields={})
                for i in range(params.items)]

    def score(self, item, prediction):
        time.sleep(self.seconds)
        return 0.0
'''


def write_slow_plugin(folder) -> None:
    """The `slow_echo` dataset into the plugin folder `folder`."""
    folder.mkdir(exist_ok=True)
    (folder / "slow_echo.py").write_text(SLOW_PLUGIN)


def with_slow_plugin(settings, tmp_path):
    """`settings` with the `slow_echo` plugin and a 3 s lease, as workers placed on a
    cluster get them (`raw`: their variables)."""
    import dataclasses

    write_slow_plugin(tmp_path / "plugins")
    extra = {"LBS_LEASE_SECONDS": "3", "LBS_PLUGIN_DIRS": str(tmp_path / "plugins")}
    return dataclasses.replace(settings, lease_seconds=3.0, plugin_dirs=(
        str(tmp_path / "plugins"),), raw={**settings.raw, **extra})


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_idle_worker_runs_the_queue_then_exits(settings, factory, with_tiny):
    (job,) = queue_on(factory).submit([jobs.NewJob(
        "builtin:tiny", "needle_in_haystack",
        {"context_lengths": [256], "depth_percents": [50], "max_new_tokens": 2})])
    worker = Worker(settings, worker_id="idle")
    started = time.monotonic()
    assert worker.run_forever(idle_exit_s=0.5) == 0
    assert time.monotonic() - started < 60
    assert queue_on(factory).get(job.id).state == JobState.SUCCEEDED.value
    (row,) = queue_on(factory).workers.all()
    assert row.state == "stopped"


def test_worker_past_its_runtime_gives_its_job_back(settings, factory, with_tiny, tmp_path,
                                                    monkeypatch):
    import dataclasses

    write_slow_plugin(tmp_path / "plugins")
    settings = dataclasses.replace(settings, plugin_dirs=(str(tmp_path / "plugins"),))
    (job,) = queue_on(factory).submit([jobs.NewJob("builtin:tiny", "slow_echo",
                                                   {"items": 20, "seconds": 0.2})])
    worker = Worker(settings, worker_id="short")
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(
        worker.run_forever(max_runtime_s=3.0)))
    runner.start()
    runner.join(60)
    assert result == [0]
    row = queue_on(factory).get(job.id)
    assert row.state == JobState.QUEUED.value  # given back, to resume elsewhere
    assert 0 < row.progress_done < 20
