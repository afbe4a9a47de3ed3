"""Results that explain themselves, in Chromium against a real server and worker: the
breakdown tables each dataset declares, samples with their references and filters, the
leaderboard, the launch form without JSON, and ids that are never reused. Screenshots
of every view at 1440 px and 390 px go to test-artifacts/."""

from __future__ import annotations

import pytest

from tests.conftest import ARTIFACTS, ROOT, LiveServer

pytestmark = pytest.mark.slow

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture
def server(with_tiny, echo_plugin_dir):
    live = LiveServer(with_tiny, {"LBS_PLUGIN_DIRS": str(echo_plugin_dir),
                                  "LBS_DATASETS_DIR": str(FIXTURES),
                                  "LBS_MAX_CONTEXT_LENGTH": "400"}).start()
    live.wait_for_worker()
    yield live
    live.stop()


def shoot(page, name: str, redraw: bool = True) -> None:
    """The current view at desktop and phone width; at phone width nothing may widen
    the page (tables scroll inside their box). `redraw`: reload at each width, so charts
    are drawn for it (False keeps what was typed or picked in the view)."""
    page.set_viewport_size({"width": 1440, "height": 900})
    page.wait_for_timeout(150)
    page.screenshot(path=ARTIFACTS / f"{name}-1440.png", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    if redraw:
        page.reload()  # drawn for the phone, as a phone would load it
        page.wait_for_timeout(1200)
    page.screenshot(path=ARTIFACTS / f"{name}-390.png", full_page=True)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"{name}: the page is {overflow}px wider than a phone"
    page.set_viewport_size({"width": 1440, "height": 900})
    if redraw:
        page.reload()
        page.wait_for_timeout(800)


def cells(table, column: str) -> list[str]:
    return [c.inner_text() for c in table.locator(f'tbody td[data-col="{column}"]').all()]


def test_breakdowns_samples_and_leaderboard(server, page, tiny_copy):
    status, body = server.request("POST", "/api/jobs", {"jobs": [
        {"model": "builtin:tiny", "dataset": "ceval", "params": {"shots": 1}},
        {"model": "builtin:tiny", "dataset": "longbench",
         "params": {"subsets": ["hotpotqa", "multifieldqa_zh", "trec"]}},
        {"model": str(tiny_copy), "dataset": "echo", "params": {}},
        {"model": tiny_copy.name, "dataset": "echo", "params": {}},
        {"model": tiny_copy.name, "dataset": "echo", "params": {"words": ["a", "b"]}}]})
    assert status == 201, body
    ceval_id, lb_id, echo_path, echo_name, echo_ab = (j["id"] for j in body["data"]["jobs"])
    ceval = server.wait_for(ceval_id, ("succeeded", "failed"))
    assert ceval["state"] == "succeeded", ceval["error"]

    # C-Eval: categories and subjects as the dataset declares them, with the API's figures
    page.goto(f"{server.url}/#/job/{ceval_id}")
    subjects = page.locator("#breakdown-subjects")
    subjects.wait_for()
    want = {s["subject"]: s for s in ceval["scores"]["subjects"]}
    assert sorted(cells(subjects, "subject")) == sorted(want)
    for row in subjects.locator("tbody tr").all():
        s = want[row.locator('td[data-col="subject"]').inner_text()]
        assert row.locator('td[data-col="score"]').inner_text() == f"{s['score']:.4f}"
        assert row.locator('td[data-col="count"]').inner_text() == str(s["count"])
        assert row.locator('td[data-col="category"]').inner_text() == s["category"]
    categories = page.locator("#breakdown-categories")
    assert sorted(cells(categories, "category")) == sorted(
        c["category"] for c in ceval["scores"]["categories"])
    averages = page.locator('[data-breakdown="averages"]')
    assert averages.locator('dd[data-key="micro"] strong').inner_text() == \
        f"{ceval['scores']['micro']:.4f}"
    assert averages.locator('dd[data-key="overall"] strong').inner_text() == \
        f"{ceval['scores']['overall']:.4f}"
    subjects.locator('th[data-key="count"] button').click()  # sorted, highest first
    counts = [int(c) for c in cells(subjects, "count")]
    assert counts == sorted(counts, reverse=True)
    subjects.locator('th[data-key="count"] button').click()  # and back
    assert [int(c) for c in cells(subjects, "count")] == sorted(counts)

    # a sample shows its reference, the choice log-likelihoods and why it scored so
    samples = server.request("GET", f"/api/jobs/{ceval_id}/samples")[1]["data"]["samples"]
    table = page.locator("#samples-table")
    first = table.locator('tbody tr[data-idx="0"]')
    assert first.locator('td[data-col="reference"]').inner_text() == \
        samples[0]["fields"]["reference"]
    assert first.locator('td[data-col="logprobs"] .chosen').inner_text().startswith(
        samples[0]["prediction"])
    assert "the reference is" in first.locator('td[data-col="why"]').inner_text()
    assert table.locator("thead").inner_text().count("Depth") == 0  # no NIAH columns here
    page.select_option('[data-filter="subject"]', "law")
    assert set(cells(table, "subject")) == {"law"}
    assert len(cells(table, "subject")) == sum(s["fields"]["subject"] == "law" for s in samples)
    page.select_option('[data-filter="subject"]', "")
    page.select_option("#outcome-filter", "wrong")
    wrong = [s for s in samples if s["score"] == 0]
    assert table.locator("tbody tr[data-idx]").count() == len(wrong)
    assert page.locator("#samples-shown").inner_text() == f"{len(wrong)} / {len(samples)}"
    page.select_option("#outcome-filter", "")
    # error bars beside the score: a macro average over subjects, from a handful of items
    page.locator("#manifest summary").click()  # the run manifest, folded
    assert page.locator('#manifest tr[data-key="versions.torch"]').is_visible()
    assert page.locator('#manifest tr[data-key="inference.device"] td').inner_text() == "cpu"
    spread = page.locator("#overall-spread").inner_text()
    assert spread.startswith(" ± ") and "[" in spread
    assert page.locator("#few-items").is_visible()
    shoot(page, "job-ceval")

    # LongBench: per subset and per length bucket, references as a list of answers
    lb = server.wait_for(lb_id, ("succeeded", "failed"))
    assert lb["state"] == "succeeded", lb["error"]
    page.goto(f"{server.url}/#/job/{lb_id}")
    subsets = page.locator("#breakdown-subsets")
    subsets.wait_for()
    want = {s["subset"]: s for s in lb["scores"]["subsets"]}
    assert sorted(cells(subsets, "subset")) == sorted(want)
    for row in subsets.locator("tbody tr").all():
        s = want[row.locator('td[data-col="subset"]').inner_text()]
        assert row.locator('td[data-col="score"]').inner_text() == f"{s['score']:.4f}"
        assert row.locator('td[data-col="count"]').inner_text() == str(s["count"])
    # LongBench-E's length buckets only with LongBench-E files (use_e): none here
    assert not lb["scores"].get("buckets")
    assert page.locator('[data-breakdown="buckets"]').count() == 0
    lb_samples = server.request("GET", f"/api/jobs/{lb_id}/samples")[1]["data"]["samples"]
    refs = page.locator('#samples-table tbody tr[data-idx="0"] td[data-col="reference"] li')
    assert refs.all_inner_texts() == lb_samples[0]["fields"]["reference"]
    page.select_option('[data-filter="subset"]', "trec")
    assert set(cells(page.locator("#samples-table"), "subset")) == {"trec"}
    assert page.locator('[data-testid="memory-chart"] circle.dot').count() >= 1
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: no row a screen tall
    page.reload()
    page.locator("#samples-table tbody tr[data-idx]").first.wait_for()
    heights = page.evaluate("[...document.querySelectorAll('#samples-table tbody tr')]"
                            ".map((r) => r.getBoundingClientRect().height)")
    assert max(heights) < 150, heights
    page.set_viewport_size({"width": 1440, "height": 900})
    shoot(page, "job-longbench")

    # the leaderboard: the folder named by path and by name is one model; another
    # configuration of the same dataset is a row of its own, named by what differs
    for job_id in (echo_path, echo_name, echo_ab):
        assert server.wait_for(job_id, ("succeeded", "failed"))["state"] == "succeeded"
    # ... and loaded once: the job naming it by name found it loaded by the path's job
    by_name = server.request("GET", f"/api/jobs/{echo_name}")[1]["data"]["job"]
    assert "load" not in [e["kind"] for e in by_name["events"]], by_name["events"]
    page.goto(f"{server.url}/#/leaderboard")
    board = page.locator("#leaderboard-table")
    board.wait_for()
    echo_rows = board.locator('tbody tr[data-dataset="echo"]')
    assert echo_rows.count() == 2
    same = board.locator(f'tbody tr[data-dataset="echo"]:has(a:text-is("#{echo_name}"))')
    assert same.get_attribute("data-model") == tiny_copy.name
    assert "2 names" in same.locator('td[data-col="model"]').inner_text()
    assert same.locator('td[data-col="runs"]').inner_text() == "2"
    assert 'words=["apple","river","stone"]' in same.locator('td[data-col="dataset"]').inner_text()
    other = board.locator(f'tbody tr[data-dataset="echo"]:has(a:text-is("#{echo_ab}"))')
    assert 'words=["a","b"]' in other.locator('td[data-col="dataset"]').inner_text()
    assert board.locator("tbody tr").count() == 4  # ceval, longbench, echo twice
    board.locator('th[data-key="score"] button').click()  # sorted by score already: reverse
    scores = [float(x.split()[0]) for x in cells(board, "score")]  # the score, then ± stderr
    assert scores == sorted(scores)
    board.locator('th[data-key="dataset"] button').click()
    assert [c.split()[0] for c in cells(board, "dataset")] == ["ceval", "echo", "echo",
                                                               "longbench"]
    assert page.locator('[data-testid="score-memory"] circle.dot').count() == 4
    assert page.locator('[data-testid="memory-length-longbench"] circle.dot').count() >= 1
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: the header is one line
    heights = page.evaluate("[...document.querySelectorAll('#leaderboard-table th')]"
                            ".map((th) => th.getBoundingClientRect().height)")
    assert max(heights) < 40, heights
    page.set_viewport_size({"width": 1440, "height": 900})
    shoot(page, "leaderboard")

    # Compare: the same folder by path and by name, item by item; two datasets refused
    page.goto(f"{server.url}/#/compare")
    page.select_option("#compare-0", str(echo_path))
    page.select_option("#compare-1", str(echo_name))
    figures = page.locator("#paired-figures")
    figures.wait_for()
    paired = server.request("GET", f"/api/compare?a={echo_path}&b={echo_name}")[1]["data"]["paired"]
    assert figures.locator('dd[data-key="shared_items"]').inner_text() == str(paired["n"])
    assert paired["n"] == 3 and paired["a_only"] == paired["b_only"] == 0
    assert page.locator("#differing-params").count() == 0  # same parameters: it says so
    shoot(page, "compare-paired", redraw=False)
    page.select_option("#compare-1", str(lb_id))
    page.locator("#compare-error").wait_for()
    assert "one dataset" in page.locator("#compare-error").inner_text()


def _niah_form(page, lengths: tuple[int, int, int] | None = None, depths: int = 2) -> None:
    page.check("#ds-needle_in_haystack")
    fs = page.locator('fieldset[data-dataset="needle_in_haystack"]')
    if lengths:
        for key, value in zip(("min", "max", "count"), lengths, strict=True):
            fs.locator(f'input[name="context_lengths.{key}"]').fill(str(value))
    fs.locator('input[name="depth_percents.count"]').fill(str(depths))
    fs.locator('input[name="max_new_tokens"]').fill("4")


def test_form_launches_niah_without_json_and_ids_are_never_reused(server, page):
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    page.goto(server.url + "/#/launch")
    page.locator("#ds-needle_in_haystack").wait_for()
    assert page.locator("#job-options").is_hidden()  # scheduling folded away
    assert page.locator('.ds[data-dataset="ceval"] .ds-status').count() == 1
    _niah_form(page, (64, 384, 2))
    # the estimate checks the fields before launch: the error is at its field
    error = page.locator('[data-field="params.context_lengths"] .field-error')
    error.wait_for()
    assert "at least 128" in error.inner_text() or "greater than or equal to 128" in \
        error.inner_text()
    page.locator('input[name="context_lengths.min"]').fill("256")
    estimate = page.locator('#launch-estimate p[data-dataset="needle_in_haystack"]')
    estimate.wait_for()
    assert "needs about" in estimate.inner_text() and ("MiB" in estimate.inner_text()
                                                       or "GiB" in estimate.inner_text())
    assert error.inner_text() == ""
    label = page.locator('[data-field="params.context_lengths"] .label').inner_text()
    assert label == "Context Lengths"
    shoot(page, "launch", redraw=False)
    page.click("#launch-submit")
    page.wait_for_url("**/#/queue")
    (listed,) = server.request("GET", "/api/jobs")[1]["data"]["jobs"]  # a summary
    job = server.request("GET", f"/api/jobs/{listed['id']}")[1]["data"]["job"]
    assert job["params"]["context_lengths"] == {"min": 256, "max": 384, "count": 2}
    assert job["params"]["depth_percents"] == {"count": 2}
    row = page.locator(f'tr[data-job="{job["id"]}"]')
    row.locator(".badge.succeeded").wait_for(timeout=120_000)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: state and progress in view
    for col in ("state", "progress"):
        for cell in (f'#queue-table th[data-col="{col}"]',
                     f'tr[data-job="{job["id"]}"] td[data-col="{col}"]'):
            box = page.locator(cell).bounding_box()
            assert box["x"] + box["width"] <= 390, (cell, box)
    shoot(page, "queue")

    page.goto(f"{server.url}/#/job/{job['id']}")
    heat = page.locator('[data-testid="heatmap"]')
    heat.wait_for()
    assert heat.locator("rect.cell").count() == 4
    assert heat.locator("text.cell-label").count() == 4  # the score in every cell
    assert page.locator('#job-meta dd[data-key="duration"]').inner_text().endswith("s")
    assert page.locator('#memory-peaks tr[data-reading="rss_peak"] td.num').inner_text() \
        .endswith(("MiB", "GiB"))
    assert page.locator("#samples-table tbody tr[data-idx]").count() == 4
    # the record shows what the job ran with: the parameters sent, the defaults marked
    sent = page.locator('#job-params tr[data-param="context_lengths"]')
    assert sent.get_attribute("data-default") == "false" and "256" in sent.inner_text()
    defaults = page.locator('#job-params tr[data-default="true"]')
    assert defaults.count() >= 1  # what the form left out, e.g. the answer to look for
    assert all(text.endswith("(default)") for text in defaults.all_inner_texts())
    assert page.locator("#job-params tr").count() == len(job["effective_params"]) > len(
        job["params"])
    shoot(page, "job-niah")

    # the list form of the same field, and a second grid for the Compare view
    page.goto(server.url + "/#/launch")
    page.check("#ds-needle_in_haystack")
    fs = page.locator('fieldset[data-dataset="needle_in_haystack"]')
    fs.locator('input[name="context_lengths-mode"][value="list"]').check()
    fs.locator('input[name="context_lengths"][data-kind="list"]').fill("256, 320")
    fs.locator('input[name="depth_percents.count"]').fill("3")
    fs.locator('input[name="max_new_tokens"]').fill("2")
    page.click("#launch-submit")
    page.wait_for_url("**/#/queue")
    newest = server.request("GET", "/api/jobs")[1]["data"]["jobs"][0]  # a summary
    second = server.request("GET", f"/api/jobs/{newest['id']}")[1]["data"]["job"]
    assert second["params"]["context_lengths"] == [256, 320]
    assert server.wait_for(second["id"], ("succeeded",))["state"] == "succeeded"
    page.goto(server.url + "/#/compare")
    page.select_option("#compare-0", str(job["id"]))
    page.select_option("#compare-1", str(second["id"]))
    page.wait_for_function("document.querySelectorAll('.side-by-side svg.heatmap').length == 2")
    page.locator("#compare-warning").wait_for()
    assert "different grids" in page.locator("#compare-warning").inner_text()
    # compared on the cells both grids have (256 tokens at depths 0 and 100)
    assert page.locator('#paired-figures dd[data-key="shared_items"]').inner_text() == "2"
    assert page.locator("#differing-params").inner_text().count("context_lengths") == 1
    assert page.locator("#heatmap-difference rect.cell").count() == 2
    shoot(page, "compare", redraw=False)

    # Delete asks first; the next job never gets the deleted id
    page.goto(server.url + "/#/queue")
    doomed = page.locator(f'tr[data-job="{second["id"]}"]')
    doomed.locator("button.delete").click()
    doomed.wait_for(state="detached", timeout=10_000)
    assert dialogs and f"#{second['id']}" in dialogs[0]
    page.goto(server.url + "/#/launch")
    _niah_form(page, (256, 256, 1), depths=1)
    page.click("#launch-submit")
    page.wait_for_url("**/#/queue")
    third = server.request("GET", "/api/jobs")[1]["data"]["jobs"][0]
    assert third["id"] == second["id"] + 1

    # the ETA never says "1 min 60 s"
    fmt = "s => import('/static/dom.js').then(m => m.fmtSeconds(s))"
    assert [page.evaluate(fmt, s) for s in (59.6, 119.6, 3599.7)] == \
        ["1 min 0 s", "2 min 0 s", "1 h 0 min"]

    page.click("#lang-toggle")  # Chinese: the form's labels and help follow
    page.goto(server.url + "/#/launch")
    page.check("#ds-needle_in_haystack")
    assert page.locator('[data-field="params.context_lengths"] .label').inner_text() == "上下文长度"
    shoot(page, "launch-zh", redraw=False)
    page.goto(f"{server.url}/#/job/{job['id']}")
    page.locator('[data-testid="heatmap"]').wait_for()
    shoot(page, "job-niah-zh")
    page.click("#lang-toggle")


OVERLAPS = """(selector) => {
  const boxes = [...document.querySelectorAll(selector)]
    .map((el) => [el.textContent, el.getBoundingClientRect()]);
  const out = [];
  boxes.forEach(([a, r], i) => boxes.slice(i + 1).forEach(([b, s]) => {
    const hit = r.left < s.right && s.left < r.right && r.top < s.bottom && s.top < r.bottom;
    if (hit) out.push(`${a} / ${b}`);
  }));
  return out;
}"""


def test_chart_labels_stay_apart_and_axes_end_on_a_label(live_server, page):
    """The leaderboard's charts as a phone draws them (340 px): dots on one spot keep
    their labels apart, long legend names wrap instead of running into each other, and
    a memory chart's y axis ends on a labelled tick above its highest point."""
    page.goto(live_server.url + "/#/leaderboard")
    page.evaluate("""async () => {
      const m = await import('/static/charts.js');
      const box = document.createElement('div');
      box.id = 'chart-check';
      box.style.width = '340px';
      box.append(m.scatterChart([
        {x: 509, y: 0, label: 'builtin:tiny', group: 0},
        {x: 512, y: 0, label: 'builtin:small', group: 1},
        {x: 510, y: 0.01, label: 'builtin:tiny', group: 2},
        {x: 560, y: 0, label: 'builtin:small', group: 3}],
        {groups: ['ceval', 'echo', 'longbench', 'needle_in_haystack'], width: 340}));
      box.append(m.lineChart([
        {name: 'builtin:small (RAM, #4)', points: [[256, 561], [384, 568]]},
        {name: 'builtin:tiny (RAM, #3)', points: [[256, 508], [384, 509]]}],
        {width: 340, testid: 'line-check'}));
      document.body.prepend(box);
    }""")
    assert page.evaluate(OVERLAPS, "#chart-check .point-label") == []
    assert page.locator("#chart-check .point-label").count() == 4  # every dot named
    assert page.evaluate(OVERLAPS, "#chart-check svg.scatter .legend-label") == []
    assert page.evaluate(OVERLAPS, '[data-testid="line-check"] .legend-label') == []
    top, highest_tick = page.evaluate("""() => {
      const svg = document.querySelector('[data-testid="line-check"]');
      const axis = [...svg.querySelectorAll('line.axisline')]
        .find((l) => l.getAttribute('x1') === l.getAttribute('x2'));
      const ticks = [...svg.querySelectorAll('text.tick[text-anchor="end"]')];
      return [+axis.getAttribute('y1'), Math.min(...ticks.map((t) => +t.getAttribute('y') - 4))];
    }""")
    assert highest_tick == pytest.approx(top)
    page.screenshot(path=ARTIFACTS / "chart-labels-340.png", full_page=True)
