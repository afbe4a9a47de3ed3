"""A data-parallel job on the web page, in Chromium against a real server and worker:
the launch form's data-parallel field (a number or auto; a bad value refused at the
field), and the job page's table of shards (per shard its worker, state, progress over
its share, attempts, memory peaks, why it waits). Screenshots at 1440 px and 390 px go
to test-artifacts/."""

from __future__ import annotations

import pytest

from tests.conftest import LiveServer, queue_on
from tests.test_results_page import cells, shoot

pytestmark = pytest.mark.slow

NIAH = "needle_in_haystack"


@pytest.fixture
def server(with_tiny):
    live = LiveServer(with_tiny).start()
    live.wait_for_worker()
    yield live
    live.stop()


def _db(server):
    from backend.queue.db import session_factory

    return session_factory(f"sqlite:///{server.data_dir / 'lbs.sqlite3'}")


def _niah_form(page) -> None:
    page.check(f"#ds-{NIAH}")
    fs = page.locator(f'fieldset[data-dataset="{NIAH}"]')
    for name, value in (("context_lengths", "256"), ("depth_percents", "0, 50, 100")):
        fs.locator(f'input[name="{name}-mode"][value="list"]').check()
        fs.locator(f'input[name="{name}"]').fill(value)
    fs.locator('input[name="max_new_tokens"]').fill("2")


def test_launch_a_data_parallel_job_and_read_its_shards(server, page):
    worker = server.wait_for_worker()["id"]
    page.goto(server.url + "/#/launch")
    page.locator(f"#ds-{NIAH}").wait_for()
    _niah_form(page)
    page.locator("#job-options-box > summary").click()
    field = page.locator('[data-field="data_parallel"]')
    assert "auto" in field.locator("small").inner_text()  # the field says what it takes
    page.fill("#opt-data_parallel", "many")
    page.click("#launch-submit")
    error = field.locator(".field-error")
    error.wait_for()
    page.wait_for_function("document.querySelector('[data-field=\"data_parallel\"] "
                           ".field-error').textContent.length > 0")
    assert "auto" in error.inner_text() and "constrained" not in error.inner_text()
    assert server.request("GET", "/api/jobs")[1]["data"]["jobs"] == []  # nothing queued
    shoot(page, "launch-data-parallel-error", redraw=False)
    page.fill("#opt-data_parallel", "2")
    page.click("#launch-submit")
    page.wait_for_url("**/#/queue")
    (listed,) = server.request("GET", "/api/jobs")[1]["data"]["jobs"]
    assert listed["data_parallel"] == 2
    row = page.locator(f'tr[data-job="{listed["id"]}"]')
    row.wait_for()
    assert "2 workers" in row.inner_text()
    job = server.wait_for(listed["id"], ("succeeded", "failed"))  # one worker: in turn
    assert job["state"] == "succeeded", job["error"]

    page.goto(f"{server.url}/#/job/{job['id']}")
    table = page.locator("#shards-table")
    table.wait_for()
    assert page.locator('#job-meta dd[data-key="data_parallel"]').inner_text() == "2"
    assert cells(table, "shard_index") == ["0", "1"]
    assert cells(table, "state") == ["succeeded", "succeeded"]
    assert cells(table, "worker_id") == [worker, worker]
    assert [c.strip() for c in cells(table, "progress")] == ["2/2", "1/1"]  # idx % 2
    assert cells(table, "attempts") == ["1", "1"]
    assert all(c.endswith(("MiB", "GiB")) for c in cells(table, "rss_peak"))
    assert "2 workers" in page.locator(".hint", has_text="shard").inner_text()
    assert "attempts" not in page.locator("#job-meta").inner_text().lower()  # per shard
    meaning = page.locator('#memory-peaks tr[data-reading="shard1_rss_peak"] td.muted')
    assert meaning.inner_text().startswith("Shard 1: the worker process's highest resident RAM")
    own = page.locator('#memory-peaks tr[data-reading="shard1_rss_own_peak"] td.muted')
    assert own.inner_text().startswith("Shard 1: this job's own peak RAM")
    assert page.locator("#samples-table tbody tr[data-idx]").count() == 3  # one list
    shoot(page, "job-shards")


def test_shards_in_every_state(server, page):
    """A job over three workers, pinned to a label the live worker lacks: shard 0 running
    on one worker, shard 1 done on another (with a GPU peak), shard 2 waiting."""
    from backend.queue.db import JobState
    from backend.queue.scheduling import Capacity

    status, body = server.request("POST", "/api/jobs", {
        "model": "builtin:tiny", "dataset": NIAH, "worker_label": "rack-9",
        "params": {"context_lengths": [256], "depth_percents": [0, 25, 50, 75, 100],
                   "max_new_tokens": 2}, "data_parallel": 3})
    assert status == 201, body
    job_id = body["data"]["job"]["id"]
    factory, caps = _db(server), Capacity(labels=("rack-9",))
    for name in ("gpu-a", "gpu-b"):
        queue_on(factory).workers.register(name, "rack-9-host", 4000, "cuda", labels=["rack-9"])
    a = queue_on(factory, lease_seconds=600).claim("gpu-a", capacity=caps)
    queue_on(factory).set_total(a.id, "gpu-a", 5)
    queue_on(factory, lease_seconds=600).record_sample(a.id, "gpu-a", {
        "idx": 0, "prompt": "p", "prompt_tokens": 1, "prediction": "x", "score": 1.0,
        "latency_s": 0.1, "output_tokens": 1, "fields": {"context_length": 256,
                                                         "depth_percent": 0.0}})
    b = queue_on(factory, lease_seconds=600).claim("gpu-b", capacity=caps)
    queue_on(factory).finish(b.id, "gpu-b", JobState.SUCCEEDED,
                             memory=[("rss_peak", "cpu", 900 * 2**20),
                                     ("cuda_max_allocated", "cuda:0", 3 * 2**30)])

    page.goto(f"{server.url}/#/job/{job_id}")
    table = page.locator("#shards-table")
    table.wait_for()
    assert cells(table, "state") == ["running", "succeeded", "queued"]
    assert cells(table, "worker_id") == ["gpu-a", "gpu-b", ""]
    assert [c.strip() for c in cells(table, "progress")] == ["1/2", "0/2", "0/1"]
    assert cells(table, "gpu_peak") == ["", "3.00 GiB", ""]
    assert cells(table, "rss_peak")[1] == "900.0 MiB"
    notes = cells(table, "note")  # why the last one waits (next: gpu-b is idle)
    assert notes[:2] == ["", ""] and "next in line" in notes[2], notes
    table.locator('th[data-key="attempts"] button').click()  # sortable like the others
    shoot(page, "job-shards-states")
