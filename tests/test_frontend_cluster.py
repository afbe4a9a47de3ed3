"""The Workers view shows what the cluster controllers decided (a real browser against a
real server; the decisions written as a controller writes them)."""

from __future__ import annotations

import pytest

from backend.queue.cluster import ClusterBook, PoolLoad
from tests.conftest import ARTIFACTS, LiveServer

pytestmark = pytest.mark.slow


def test_workers_view_shows_each_pools_latest_decision(data_dir, page):
    from backend.queue.db import session_factory

    server = LiveServer(data_dir, {"LBS_WORKERS": "0"}).start()
    try:
        book = ClusterBook(session_factory(f"sqlite:///{data_dir / 'lbs.sqlite3'}"), 60.0)
        book.record("ray-1gpu", "ray", PoolLoad(3, 0), placed=0, started=3,
                    message="3 queued for the pool, 0 busy, 0 held: asked ray for 3 more")
        book.record("slurm-2gpu", "slurm", PoolLoad(0, 0), placed=0, started=0,
                    message="0 queued for the pool, 0 busy, 0 held: no worker held "
                            "(no GPU in use)")
        page.goto(server.url + "/#/workers")
        row = page.locator('#cluster-table tr[data-pool="ray-1gpu"]')
        row.wait_for()
        assert row.locator(".queued").inner_text() == "3"
        assert "asked ray for 3 more" in row.locator(".decision").inner_text()
        assert "no GPU in use" in page.locator('tr[data-pool="slurm-2gpu"]').inner_text()
        # polled: the controller's next decision shows without a reload
        book.record("ray-1gpu", "ray", PoolLoad(0, 3), placed=3, started=0,
                    message="0 queued for the pool, 3 busy, 3 held: holding")
        page.locator('tr[data-pool="ray-1gpu"] .held', has_text="3").wait_for(timeout=5_000)
        page.locator("#cluster-live summary").click()
        assert page.locator("#cluster-decisions li").count() == 3
        page.screenshot(path=ARTIFACTS / "workers-cluster.png", full_page=True)
        page.goto("about:blank")
    finally:
        server.stop()


@pytest.fixture
def slurm():
    from tests.slurm import running_cluster

    with running_cluster() as cluster:
        yield cluster


def test_an_operator_starts_and_stops_a_pool_from_the_workers_view(data_dir, page, slurm):
    server = LiveServer(data_dir, {"LBS_WORKERS": "0", "LBS_CLUSTER_FROM_API": "1",
                                   "SLURM_CONF": slurm.env["SLURM_CONF"]}).start()
    try:
        page.goto(server.url + "/#/workers")
        page.locator("#cluster-start-box > summary").click()
        page.fill("#cluster-max_workers", "0")
        page.click("#cluster-start")
        error = page.locator('#cluster-form .field-error[data-field="max_workers"]')
        error.wait_for()
        assert "max_workers" in error.inner_text()  # shown next to the field
        page.fill("#cluster-max_workers", "2")
        page.fill("#cluster-gpus_per_worker", "0")
        page.fill("#cluster-pool", "page-pool")
        page.click("#cluster-start")
        page.locator('li[data-controller="page-pool"]').wait_for(timeout=10_000)
        row = page.locator('#cluster-table tr[data-pool="page-pool"]')
        row.wait_for(timeout=60_000)  # the controller's first look at the queue
        assert "no GPU in use" in row.inner_text()
        page.screenshot(path=ARTIFACTS / "workers-cluster-start.png", full_page=True)
        page.locator('li[data-controller="page-pool"] .stop-pool').click()
        page.locator('li[data-controller="page-pool"]').wait_for(state="detached",
                                                                 timeout=30_000)
        page.goto("about:blank")
    finally:
        server.stop()
