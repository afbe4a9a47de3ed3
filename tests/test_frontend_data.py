"""The Launch form shows each dataset's data status before launching: ready (with its
items), missing (with the fetch command, the hub id and the folder to copy into, and a
Fetch button when the server allows data downloads), and a fetch running to ready;
in Chromium against a real server whose hub is the loopback stand-in."""

from __future__ import annotations

import re
import shutil

import pytest

from backend.common.commands import lbs_command
from tests.conftest import ARTIFACTS, ROOT, LiveServer
from tests.hub_server import FakeHub

pytestmark = pytest.mark.slow


def test_launch_form_shows_data_status_and_fetches(with_tiny, tmp_path, page):  # noqa: F811
    hub = FakeHub(delay_s=1.5).start()
    datasets_dir = tmp_path / "ds"
    shutil.copytree(ROOT / "tests" / "fixtures" / "gsm8k", datasets_dir / "gsm8k")
    live = LiveServer(with_tiny, {
        "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
        "LBS_ALLOW_DATA_DOWNLOAD": "1", "LBS_DATASETS_DIR": str(datasets_dir)}).start()
    try:
        page.goto(live.url + "/")
        ready = page.locator('#data-gsm8k[data-state="ready"]')
        ready.wait_for()
        page.locator('#data-gsm8k:has-text("3 items")').wait_for(timeout=15_000)  # test split
        assert "by split: test 3, train 2" in ready.locator(".data-splits").inner_text()
        assert str(datasets_dir / "gsm8k") in ready.inner_text()
        assert page.locator('#data-needle_in_haystack[data-state="ready"]').count() == 1

        missing = page.locator('#data-longbench_v2[data-state="missing"]')
        text = missing.inner_text()
        assert lbs_command("data fetch longbench_v2", ROOT) in text
        assert "THUDM/LongBench-v2" in text and str(datasets_dir / "longbench_v2") in text
        # the command to copy reads as text, not fine print
        size = "parseFloat(getComputedStyle(document.querySelector(s)).fontSize)"
        assert page.evaluate(f"(s) => {size}", "#data-longbench_v2 code") >= \
            0.85 * page.evaluate(f"(s) => {size}", "body")
        page.screenshot(path=ARTIFACTS / "launch-data-status.png", full_page=True)

        page.locator('#data-ceval button.data-fetch').click()
        page.locator('#data-ceval[data-state="fetching"]').wait_for(timeout=15_000)
        assert "fetching data" in page.locator("#data-ceval").inner_text()
        page.screenshot(path=ARTIFACTS / "launch-data-fetching.png", full_page=True)
        page.locator('#data-ceval[data-state="ready"]').wait_for(timeout=120_000)
        page.locator("#data-ceval").filter(has_text=re.compile(r"\d+ items")).wait_for(
            timeout=15_000)
        assert "Hugging Face cache" in page.locator("#data-ceval").inner_text()
        assert page.locator("#data-ceval button.data-fetch").count() == 0

        # a built-in model's score says its weights are random (near-0 scores expected)
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "gsm8k",
            "params": {"max_new_tokens": 4, "max_samples": 1}})
        assert status == 201, body
        job = live.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"))
        assert job["state"] == "succeeded", job["error"]
        page.goto(f"{live.url}/#/job/{job['id']}")
        note = page.locator(".overall .builtin-note")
        note.wait_for()
        assert "random weights" in note.inner_text() and "near 0" in note.inner_text()
    finally:
        live.stop()
        hub.stop()
