"""The web page in a real browser (Debian's Chromium driven by Playwright) against a real
server + worker. Screenshots of the main views go to test-artifacts/."""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import ARTIFACTS, ROOT, LiveServer, manager_status, queue_on

pytestmark = pytest.mark.slow

@pytest.fixture
def server(with_tiny, echo_plugin_dir):
    live = LiveServer(with_tiny, {"LBS_PLUGIN_DIRS": str(echo_plugin_dir),
                                  "GPU_IDLE_TIMEOUT": "900"}).start()
    live.wait_for_worker()
    yield live
    live.stop()


def _fill(page, name: str, value: str) -> None:
    """A NIAH form field; a list (context_lengths, depth_percents) is typed as a list."""
    fs = page.locator('fieldset[data-dataset="needle_in_haystack"]')
    mode = fs.locator(f'input[name="{name}-mode"][value="list"]')
    if mode.count():
        mode.check()
    fs.locator(f'input[name="{name}"]').fill(value)


def _open_scheduling(page) -> None:
    page.locator("#job-options-box > summary").click()


def test_launch_watch_and_read_a_niah_job(server, page):
    page.goto(server.url + "/")
    page.check("#ds-needle_in_haystack")
    _fill(page, "context_lengths", "64")
    page.click("#launch-submit")
    error = page.locator('[data-field="params.context_lengths"] .field-error')
    error.wait_for()
    assert "at least 128" in error.inner_text()  # shown next to the field
    page.screenshot(path=ARTIFACTS / "launch-error.png", full_page=True)

    _fill(page, "context_lengths", "256, 384")
    _fill(page, "depth_percents", "0, 50, 100")
    _fill(page, "max_new_tokens", "4")
    page.click("#launch-submit")
    page.wait_for_url("**/#/queue")
    row = page.locator('tr[data-job="1"]')
    row.locator(".badge.succeeded").wait_for(timeout=120_000)
    assert row.locator("progress").get_attribute("value") == "100"
    page.screenshot(path=ARTIFACTS / "queue.png", full_page=True)

    row.locator("a").click()
    page.wait_for_selector('[data-testid="heatmap"]')
    cells = page.locator('[data-testid="heatmap"] rect.cell')
    assert cells.count() == 6
    tooltip = cells.first.locator("title").text_content()
    assert "Context length 256" in tooltip and "Prediction:" in tooltip
    # the highest peak of each context length, the job's own RAM
    assert page.locator('[data-testid="memory-chart"] circle.dot').count() == 2
    assert "Peak RAM, this job" in page.locator('[data-testid="memory-chart"]').text_content()
    assert page.locator("#samples-table tbody tr").count() == 6
    for reading in ("rss_peak", "rss_own_peak", "rss_baseline"):
        assert page.locator(f'#memory-peaks tr[data-reading="{reading}"]').count() == 1
    assert "this job's own peak RAM" in page.locator(
        '#memory-peaks tr[data-reading="rss_own_peak"]').inner_text()
    page.screenshot(path=ARTIFACTS / "job-detail.png", full_page=True)

    # model output is text: a reply that looks like HTML stays text
    assert page.locator("#samples-table .prediction script").count() == 0

    page.goto(server.url + "/#/leaderboard")
    page.wait_for_selector("#leaderboard-table")
    assert "builtin:tiny" in page.locator("#leaderboard-table").inner_text()
    # RAM on the leaderboard is the job's own; the process's shows on hover
    assert "Peak RAM, worker process" in page.locator(
        "#leaderboard-table span.peak").first.get_attribute("title")
    page.screenshot(path=ARTIFACTS / "leaderboard.png", full_page=True)
    page.goto(server.url + "/#/compare")
    page.select_option("#compare-0", "1")
    page.select_option("#compare-1", "1")
    page.wait_for_function("document.querySelectorAll('.side-by-side svg.heatmap').length == 2")
    page.set_viewport_size({"width": 1024, "height": 768})  # a laptop
    page.goto(server.url + "/#/launch")
    page.check("#ds-needle_in_haystack")
    page.keyboard.press("Tab")  # the form is reachable by keyboard
    page.screenshot(path=ARTIFACTS / "launch-laptop.png", full_page=True)
    page.set_viewport_size({"width": 1366, "height": 900})
    page.goto(f"{server.url}/#/job/1")
    page.wait_for_selector('[data-testid="heatmap"]')

    page.click("#lang-toggle")
    page.wait_for_selector("text=任务队列")
    page.reload()
    page.wait_for_selector("text=发起评测")  # remembered per browser
    page.screenshot(path=ARTIFACTS / "job-detail-zh.png", full_page=True)
    page.click("#lang-toggle")


def test_cancel_and_models_panel(server, tiny_copy, page):
    # a long job to cancel from the page
    status, body = server.request("POST", "/api/jobs", {
        "model": "builtin:tiny", "dataset": "needle_in_haystack",
        "params": {"context_lengths": {"min": 1024, "max": 8000, "count": 20},
                   "depth_percents": {"count": 11}, "max_new_tokens": 32}})
    assert status == 201
    long_id = body["data"]["job"]["id"]
    page.goto(server.url + "/#/queue")
    row = page.locator(f'tr[data-job="{long_id}"]')
    row.locator(".badge.running").wait_for(timeout=60_000)
    row.locator("button.cancel").click()
    row.locator(".badge.cancelled").wait_for(timeout=60_000)

    # a cached model, then offload/release from the models panel
    status, body = server.request("POST", "/api/jobs", {"model": str(tiny_copy),
                                                        "dataset": "echo"})
    server.wait_for(body["data"]["job"]["id"], ("succeeded",))
    page.goto(server.url + "/#/models")
    model_row = page.locator(f'tr[data-model="{tiny_copy}"]')
    model_row.wait_for(timeout=15_000)
    assert model_row.locator(".location").inner_text() == "cpu"
    page.screenshot(path=ARTIFACTS / "models.png", full_page=True)
    model_row.locator("button.offload").click()  # no GPU here: it says so, model stays
    page.wait_for_selector("#models-table")
    model_row.locator("button.pin").click()
    page.wait_for_function(
        f"""() => [...document.querySelectorAll('tr[data-model]')]
             .some(r => r.dataset.model === {str(tiny_copy)!r} && r.innerText.includes('yes'))""")
    model_row.locator("button.pin").click()  # unpin
    model_row.locator("button.release").click()
    model_row.wait_for(state="detached", timeout=15_000)
    assert page.locator("#models-table").inner_text().strip().endswith("No model is loaded.")
    # with no model loaded the timeout box still shows the value in force
    page.reload()
    page.wait_for_function("document.querySelector('#idle-timeout').value !== ''")
    assert page.input_value("#idle-timeout") == "900"
    stats = page.locator("#memory-stats").inner_text()  # one unit on the page: GiB/MiB
    assert "GiB" in stats and not re.search(r"\b[KMG]B\b", stats), stats
    page.screenshot(path=ARTIFACTS / "models-empty.png", full_page=True)
    page.fill("#idle-timeout", "120")
    page.click("#apply-timeout")
    page.goto(server.url + "/#/compare")  # any finished job can be compared: the echo job
    echo_id = str(body["data"]["job"]["id"])
    page.select_option("#compare-0", echo_id)
    page.select_option("#compare-1", echo_id)
    page.wait_for_selector("#paired-figures")
    assert page.locator('#paired-figures dd[data-key="shared_items"]').inner_text() == "3"
    assert page.locator('#paired-figures dd[data-key="mcnemar"]').inner_text() == "1.0000"
    page.screenshot(path=ARTIFACTS / "compare.png", full_page=True)


def test_model_output_is_shown_as_text(server, page):
    """A reply that looks like HTML is displayed as characters, never run or rendered."""
    from backend.queue import jobs
    from backend.queue.db import JobState, session_factory

    factory = session_factory(f"sqlite:///{server.data_dir / 'lbs.sqlite3'}")
    (job,) = queue_on(factory).submit([jobs.NewJob("builtin:tiny", "needle_in_haystack", {})])
    # the server's own worker may claim it first; take it only if it is still ours to take
    claimed = queue_on(factory).claim("page-test")
    if claimed is None or claimed.id != job.id:
        pytest.skip("the live worker took the job first")
    evil = '<img src=x onerror="document.title=\'pwned\'"><b>bold</b>'
    queue_on(factory).record_sample(job.id, "page-test", dict(
        idx=0, prompt="<script>alert(1)</script>", prompt_tokens=3, prediction=evil, score=0.0,
        latency_s=0.1, output_tokens=3, fields={"context_length": 256, "depth_percent": 0.0}))
    queue_on(factory).finish(job.id, "page-test", JobState.SUCCEEDED)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.url}/#/job/{job.id}")
    page.wait_for_timeout(1500)
    assert not errors, errors
    cell = page.locator("#samples-table .prediction").first
    cell.wait_for()
    assert cell.inner_text() == evil
    assert page.locator("#samples-table img, #samples-table b, #samples-table script").count() == 0
    assert page.title() != "pwned"


def test_page_asks_for_the_token_once(with_tiny, page):
    live = LiveServer(with_tiny, {"LBS_API_TOKEN": "page-token", "LBS_WORKERS": "0"}).start()
    try:
        asked = []

        def answer(dialog):
            asked.append(dialog.message)
            dialog.accept("page-token")

        page.on("dialog", answer)
        page.goto(live.url + "/#/launch")
        page.wait_for_selector("#ds-needle_in_haystack")  # datasets loaded with the token
        page.goto(live.url + "/#/queue")
        page.wait_for_selector("#queue-table tr")
        assert len(asked) == 1 and "LBS_API_TOKEN" in asked[0]
        page.goto("about:blank")  # stop polling before the server goes away
    finally:
        live.stop()


def _db(server):
    from backend.queue.db import session_factory

    return session_factory(f"sqlite:///{server.data_dir / 'lbs.sqlite3'}")


def _add_workers(server, current_job_id: int) -> None:
    """Beside the live worker: a lost GPU worker (busy with `current_job_id` when its
    heartbeats stopped) and a stopped one, written straight into the server's database."""
    from datetime import timedelta

    import sqlalchemy as sa

    from backend.queue.db import WorkerRow, WorkerState, utcnow

    factory = _db(server)
    gpus = [{"index": i, "name": "Fake GPU", "total_bytes": 80 * 2**30, "free_bytes": 60 * 2**30}
            for i in range(2)]
    queue_on(factory).workers.register("ghost-1", "gpu-box", 4242, "cuda",
                                       labels=["gpu-box", "a100"], gpus=gpus,
                                       gpu_free_bytes=120 * 2**30)
    queue_on(factory).workers.register("done-1", "old-box", 4343, "cpu", labels=["old-box"])
    queue_on(factory).workers.heartbeat("done-1", WorkerState.STOPPED.value)
    with factory.begin() as session:
        session.execute(sa.update(WorkerRow).where(WorkerRow.id == "ghost-1").values(
            heartbeat_at=utcnow() - timedelta(minutes=10), current_job_id=current_job_id))


def test_workers_panel_waiting_reason_and_scheduling_fields(server, page):
    live = server.wait_for_worker()
    small = {"context_lengths": [256], "depth_percents": [0], "max_new_tokens": 2}
    status, body = server.request("POST", "/api/jobs", {
        "model": "builtin:tiny", "dataset": "needle_in_haystack", "params": small,
        "worker_label": "nowhere"})
    assert status == 201, body
    pinned = body["data"]["job"]["id"]
    _add_workers(server, pinned)

    page.goto(server.url + "/#/workers")
    row = page.locator(f'tr[data-worker="{live["id"]}"]')
    row.wait_for()
    assert row.get_attribute("data-state") in ("idle", "busy")
    assert row.locator(".state").inner_text() in ("idle", "busy")
    assert live["host"] in row.inner_text() and "none (CPU)" in row.inner_text()
    ghost = page.locator('tr[data-worker="ghost-1"]')
    assert ghost.get_attribute("class") == "worker-lost"
    assert ghost.locator(".badge.lost").count() == 1
    assert "2 × GPU" in ghost.inner_text() and "#1 Fake GPU: 60.0 / 80.0 GiB" in ghost.inner_text()
    assert "a100" in ghost.locator("td").nth(3).inner_text()
    assert page.locator('tr[data-worker="done-1"]').get_attribute("class") == "worker-stopped"
    assert page.locator("#workers-summary").inner_text() == "1 of 3 workers alive"
    page.screenshot(path=ARTIFACTS / "workers.png", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: only the table scrolls
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 1
    page.screenshot(path=ARTIFACTS / "workers-390.png", full_page=True)
    page.set_viewport_size({"width": 1366, "height": 900})
    # polled: a worker that registers now shows up without a reload

    queue_on(_db(server)).workers.register("late-1", "late-box", 4444, "cpu")
    page.locator('tr[data-worker="late-1"] .badge.idle').wait_for(timeout=5_000)
    page.click("#lang-toggle")
    assert page.locator('tr[data-worker="ghost-1"] .badge.lost').inner_text() == "失联"
    page.click("#lang-toggle")

    # the lost worker's job link opens the job, which says why it waits
    page.locator('tr[data-worker="ghost-1"] .current-job a').click()
    page.wait_for_url(f"**/#/job/{pinned}")
    assert "nowhere" in page.locator("#waiting-reason").inner_text()
    assert page.locator('#job-meta dd[data-key="worker_label"]').inner_text() == "nowhere"
    assert page.locator('#job-meta dd[data-key="memory_estimate"]').inner_text().endswith("MiB")
    page.goto(server.url + "/#/queue")
    assert "nowhere" in page.locator(f'tr[data-job="{pinned}"] .waiting').inner_text()

    # scheduling fields of the form: the API's refusal shows at the field, then a good one
    page.goto(server.url + "/#/launch")
    page.check("#ds-needle_in_haystack")
    _fill(page, "context_lengths", "256")
    _fill(page, "depth_percents", "0")
    _open_scheduling(page)
    page.fill("#opt-priority", "7")
    page.fill("#opt-submitter", "alice")
    page.fill("#opt-worker_label", "no spaces allowed")
    page.fill("#opt-num_gpus", "2")
    page.click("#launch-submit")
    error = page.locator('#job-options [data-field="worker_label"] .field-error')
    error.wait_for()
    assert "pattern" in error.inner_text()
    assert "worker_label" in page.locator("#launch-status").inner_text()
    page.fill("#opt-worker_label", "")
    page.click("#launch-submit")
    page.wait_for_url("**/#/queue")
    status, body = server.request("GET", "/api/jobs?submitter=alice")
    (job,) = body["data"]["jobs"]
    assert job["priority"] == 7 and job["submitter"] == "alice"
    assert job["num_gpus"] == 2 and job["worker_label"] is None
    assert job["state"] == "queued" and "needs 2 GPUs" in job["waiting_reason"]  # CPU workers
    assert "needs 2 GPUs" in page.locator(f'tr[data-job="{job["id"]}"] .waiting').inner_text()

    # the lost worker's last published status stays on the models panel, marked as such

    queue_on(_db(server)).commands.publish_status(
        "ghost-1", manager_status("ghost-model", time.time() - 600))
    page.goto(server.url + "/#/models")
    ghost_model = page.locator('tr[data-model="ghost-model"]')
    ghost_model.wait_for()
    assert ghost_model.get_attribute("class") == "stale"
    assert "ghost-1 (lost)" in ghost_model.inner_text()


def test_method_comparison_table(server, page):
    page.goto(server.url + "/#/launch")
    page.check("#ds-needle_in_haystack")
    _fill(page, "context_lengths", "256, 384")
    _fill(page, "depth_percents", "0, 100")
    _fill(page, "max_new_tokens", "4")
    methods = page.locator('[data-dataset="needle_in_haystack"] [data-field="params.methods"]')
    methods.locator('input[value="basic"]').check()
    methods.locator('input[value="optimized"]').check()
    page.click("#launch-submit")
    page.wait_for_url("**/#/queue")
    (listed,) = server.request("GET", "/api/jobs")[1]["data"]["jobs"]  # lists: summaries
    job = server.request("GET", f"/api/jobs/{listed['id']}")[1]["data"]["job"]
    assert job["params"]["methods"] == ["basic", "optimized"]
    row = page.locator(f'tr[data-job="{job["id"]}"]')
    row.locator(".badge.succeeded").wait_for(timeout=60_000)
    row.locator("a").click()
    table = page.locator("#methods-table")
    table.wait_for()
    assert [r.get_attribute("data-method") for r in table.locator("tbody tr").all()] == \
        ["basic", "optimized"]
    assert table.locator("th").nth(3).inner_text() == "Decode (tokens/s)"
    second = table.locator('tr[data-method="optimized"]')
    assert second.locator('td[data-col="decode_tokens_per_s"] .rel').inner_text().endswith("×")
    assert second.locator('td[data-col="peak_gpu_mb"]').inner_text() == "—"  # no GPU here
    assert table.locator('tr[data-method="basic"] .rel').count() == 0  # the reference row
    assert re.fullmatch(r"Agreement: \d+(\.\d)?% — .+", page.locator("#agreement").inner_text())
    assert page.locator('[data-testid="heatmap"] rect.cell').count() == 4
    assert page.locator('#samples-table td[data-col="method"]').count() == 8
    assert page.locator("#samples-table thead").inner_text().split("\t")[:2] == ["ID", "Method"]
    page.screenshot(path=ARTIFACTS / "job-methods.png", full_page=True)


def test_every_string_has_a_chinese_translation():
    text = (ROOT / "frontend" / "i18n.js").read_text()
    en, zh = text.split("\n  zh: {", 1)
    keys = [set(re.findall(r"\b(\w+): \"", block)) for block in (en, zh.split("\n};", 1)[0])]
    assert keys[0] - keys[1] == set() and keys[1] - keys[0] == set()


def test_every_dataset_text_has_a_chinese_translation():
    """The Launch form in Chinese: each built-in dataset's description, cost, and its
    parameters' titles and help come from the server in English and are translated by
    i18n.js's exact-text table (lm_eval's stayed English)."""
    import json

    from backend.datasets.registry import BUILTIN, get_dataset

    text = (ROOT / "frontend" / "i18n.js").read_text()
    table = text.split("const ZH_TEXT = {", 1)[1].split("\n};", 1)[0]
    missing = []
    for name in sorted(BUILTIN):  # a plugin another test registered here is not ours
        dataset = get_dataset(name)
        strings = [dataset.description, dataset.cost]
        for prop in dataset.Params.model_json_schema()["properties"].values():
            strings += [prop.get("title"), prop.get("description")]
        missing += [f"{name}: {s}" for s in strings
                    if s and f"{json.dumps(s, ensure_ascii=False)}:" not in table]
    assert missing == []
