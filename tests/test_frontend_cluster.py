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
        page.locator("#cluster summary").click()
        assert page.locator("#cluster-decisions li").count() == 3
        page.screenshot(path=ARTIFACTS / "workers-cluster.png", full_page=True)
        page.goto("about:blank")
    finally:
        server.stop()
