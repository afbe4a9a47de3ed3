"""lm-evaluation-harness tasks as a dataset (backend/datasets/lm_eval_tasks.py), on local
task YAMLs with json data files (no network): our job's per-task metrics equal
`lm_eval.simple_evaluate` with its HF backend on the same built-in model, document by
document; a job whose worker is SIGKILLed resumes to the same numbers; the server lists
the tasks without importing torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS, LiveServer
from tests.test_faults import _rows

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
TASKS = ["lbs_gen", "lbs_mc", "lbs_ppl"]


def _ours(tasks: list[str], extra: dict | None = None):
    from backend.apps.cli import _ListSink
    from backend.common.config import load_settings
    from backend.engine.evaluation import run_evaluation
    from backend.engine.memory.manager import ModelManager
    from backend.engine.preparation import prepare

    settings = load_settings()
    job = prepare("builtin:tiny", "lm_eval", {"tasks": tasks, **(extra or {})}, settings,
                  confine=False)
    sink = _ListSink()
    outcome = run_evaluation(job, ModelManager(use_cache=False), settings, sink)
    return outcome, sink


def _metrics(entries) -> dict[tuple[str, str], tuple[float, float | None]]:
    return {(s.labels["task"], f"{s.labels['metric']},{s.labels['filter']}"):
            (s.value, s.labels["stderr"]) for s in entries if s.name == "metric"}


def _fixture_tasks(tasks_dir: Path):
    """lm-eval's own TaskManager over the fixture YAMLs alone: the reference runs need
    nothing else, and indexing lm-eval's ~15,000 bundled names costs ~15 s a time."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def test_metrics_equal_lm_eval_hf_backend(with_tiny, tasks_dir):
    import lm_eval

    model = with_tiny / "models" / "builtin-tiny-v1"
    ref = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model},dtype=float32", tasks=TASKS,
        task_manager=_fixture_tasks(tasks_dir), device="cpu", batch_size=1, log_samples=True)
    outcome, sink = _ours(TASKS)
    ours = _metrics(outcome.scores)
    expected = {}
    for task, values in ref["results"].items():
        for key, value in values.items():
            if "," in key and "_stderr," not in key:
                metric, _, filt = key.partition(",")
                stderr = values[f"{metric}_stderr,{filt}"]
                expected[(task, key)] = (value, None if stderr == "N/A" else stderr)
    assert set(ours) == set(expected)
    assert len(expected) == 6  # acc, acc_norm, exact_match, three perplexity metrics
    for key, (value, stderr) in expected.items():
        assert ours[key][0] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        if stderr is None:
            assert ours[key][1] is None, key
        else:
            assert ours[key][1] == pytest.approx(stderr, rel=1e-6, abs=1e-6), key
    # document by document: the generation after the regex filter, each choice's
    # log-likelihood and is_greedy, each text's rolling log-likelihood
    rows = {(r.fields["task"], r.fields["doc_id"]): r for r in sink.records}
    assert len(rows) == 14
    for task, samples in ref["samples"].items():
        for s in samples:
            row = rows[(task, s["doc_id"])]
            if task == "lbs_gen":
                assert row.prediction == s["filtered_resps"][0], s["doc_id"]
                assert row.fields["raw"] == s["resps"][0][0]
            elif task == "lbs_mc":
                for got, want in zip(row.fields["resps"], s["resps"], strict=True):
                    assert got[0] == pytest.approx(float(want[0][0]), abs=1e-5)
                    assert got[1] == (want[0][1] in (True, "True"))
            else:
                assert row.fields["loglikelihood"] == pytest.approx(float(s["resps"][0][0]),
                                                                    abs=1e-4)
    # lm-eval's own loop on our runner (its model interface served by RunnerLM)
    from backend.common.config import load_settings
    from backend.datasets.lm_eval_lm import RunnerLM
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import resolve_model

    settings = load_settings()
    runner = HFRunner.load(resolve_model("builtin:tiny", settings, confine=False),
                           LoadOptions.from_settings(settings), settings)
    theirs = lm_eval.simple_evaluate(model=RunnerLM(runner), tasks=TASKS,
                                     task_manager=_fixture_tasks(tasks_dir))
    for (task, key), (value, _) in expected.items():
        assert theirs["results"][task][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    versions = {s.labels["what"]: s.labels["version"] for s in outcome.scores
                if s.name == "version"}
    assert versions["lm-eval"] == "0.4.13" and versions["lbs_gen"] == 2.0


def test_choices_without_context_are_conditioned_on_the_prefix_token(with_tiny, tasks_dir):
    """An empty context (lm-eval scores the continuation after its prefix token, BOS)
    gives the HF backend's numbers too."""
    import lm_eval

    model = with_tiny / "models" / "builtin-tiny-v1"
    ref = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model},dtype=float32",
        tasks=["lbs_mc_nocontext"], task_manager=_fixture_tasks(tasks_dir),
        device="cpu", batch_size=1, log_samples=True)
    _, sink = _ours(["lbs_mc_nocontext"])
    assert len(sink.records) == 6
    for s in ref["samples"]["lbs_mc_nocontext"]:
        (row,) = [r for r in sink.records if r.fields["doc_id"] == s["doc_id"]]
        for got, want in zip(row.fields["resps"], s["resps"], strict=True):
            assert got[0] == pytest.approx(float(want[0][0]), abs=1e-5)


def test_group_aggregate_and_num_fewshot(with_tiny, tasks_dir):
    """A group runs its tasks and gets lm-eval's size-weighted aggregate; num_fewshot
    puts examples into the multiple-choice prompts."""
    outcome, sink = _ours(["lbs_group"], {"num_fewshot": 2, "limit": 3})
    metrics = _metrics(outcome.scores)
    assert ("lbs_group", "acc,none") in metrics
    assert metrics[("lbs_group", "acc,none")][0] == pytest.approx(metrics[("lbs_mc",
                                                                            "acc,none")][0])
    mc = [r for r in sink.records if r.fields["task"] == "lbs_mc"]
    assert len(mc) == 3 and all(r.prompt.count("Question:") == 3 for r in mc)


def test_cancel_stops_between_documents_and_a_resume_skips_stored_ones(with_tiny, tasks_dir):
    """A sink that says stop (a cancelled job) ends the job after that document; a resumed
    job answers only the documents not stored and aggregates all of them."""
    from backend.apps.cli import _ListSink
    from backend.common.config import load_settings
    from backend.engine.evaluation import run_evaluation
    from backend.engine.memory.manager import ModelManager
    from backend.engine.preparation import prepare

    class Stopping(_ListSink):
        def write(self, record):
            super().write(record)
            return len(self.records) < 3

    settings = load_settings()
    params = {"tasks": ["lbs_mc"]}
    first = Stopping()
    job = prepare("builtin:tiny", "lm_eval", params, settings, confine=False)
    assert run_evaluation(job, ModelManager(use_cache=False), settings, first).stopped
    assert [r.idx for r in first.records] == [0, 1, 2]

    class Resumed(_ListSink):
        def stored(self):
            return {r.idx: (r.fields, r.score) for r in first.records}

    second = Resumed()
    job = prepare("builtin:tiny", "lm_eval", params, settings, confine=False)
    outcome = run_evaluation(job, ModelManager(use_cache=False), settings, second)
    assert [r.idx for r in second.records] == [3, 4, 5]
    acc = _metrics(outcome.scores)[("lbs_mc", "acc,none")]
    whole, _ = _ours(["lbs_mc"])
    assert acc == _metrics(whole.scores)[("lbs_mc", "acc,none")]
    assert [s.count for s in outcome.scores if s.name == "metric"][0] == 6


def test_openai_runner_refuses_rolling_clearly():
    from backend.runners.openai.runner import OpenAIRunner

    with pytest.raises(ValueError, match="cannot score whole texts"):
        OpenAIRunner.loglikelihood_rolling(object.__new__(OpenAIRunner), ["text"])
    # a prompt longer than the context is refused, not sent whole
    from backend.engine.contracts import GenerationRequest, LoglikelihoodRequest

    with pytest.raises(ValueError, match="cannot cut it token by token"):
        OpenAIRunner.generate(object.__new__(OpenAIRunner),
                              [GenerationRequest("long prompt", 4, keep_last=3)])
    with pytest.raises(ValueError, match="cannot cut it token by token"):
        OpenAIRunner.loglikelihood(object.__new__(OpenAIRunner),
                                   [LoglikelihoodRequest("long", " prompt", keep_last=3)])


def test_unknown_task_is_a_clear_error(with_tiny, tasks_dir):
    from backend.engine.contracts import ParamError

    with pytest.raises(ParamError, match="unknown lm-eval task.*no_such_task"):
        _ours(["no_such_task"])


def test_server_does_not_import_torch_for_the_dataset(tasks_dir):
    # describe() starts indexing lm-eval's tasks in a subprocess; this process ends its
    # own, which would otherwise run on alone for minutes of CPU the other tests need
    code = ("import sys; from backend.datasets.registry import get_dataset;"
            "d = get_dataset('lm_eval'); d.describe();"
            "d.parse_params({'tasks': ['lbs_mc']});"
            "print('torch' in sys.modules, 'lm_eval' in sys.modules);"
            "import psutil; [p.kill() for p in psutil.Process().children(recursive=True)]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_numbers(with_tiny, tasks_dir):
    env = {"LBS_LEASE_SECONDS": "2", "LBS_LM_EVAL_INCLUDE_PATH": str(tasks_dir),
           "HF_DATASETS_OFFLINE": "1"}
    live = LiveServer(with_tiny, env).start()
    try:
        worker = live.wait_for_worker()
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "lm_eval", "params": {"tasks": TASKS}})
        assert status in (200, 201, 202), body
        job_id = body["data"]["job"]["id"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            job = live.request("GET", f"/api/jobs/{job_id}")[1]["data"]["job"]
            if job["progress"]["done"] >= 2:
                break
            time.sleep(0.05)
        assert job["progress"]["done"] < 14, "the job finished before the kill"
        os.kill(worker["pid"], signal.SIGKILL)
        job = live.wait_for(job_id, ("succeeded", "failed"), timeout=300)
        assert job["state"] == "succeeded", job["error"]
        assert job["attempts"] == 2
        assert job["progress"] == {"done": 14, "total": 14}
        assert _rows(with_tiny, job_id) == (14, 14), "one row per document, none twice"
        resumed = {(m["task"], m["metric"], m["filter"]): m["score"]
                   for m in job["scores"]["metrics"]}
        listing = live.request("GET", "/api/datasets")[1]["data"]["datasets"]
        assert any(d["name"] == "lm_eval" for d in listing)
    finally:
        live.stop()
    outcome, _ = _ours(TASKS)
    fresh = {(s.labels["task"], s.labels["metric"], s.labels["filter"]): s.value
             for s in outcome.scores if s.name == "metric"}
    assert resumed.keys() == fresh.keys()
    for key, value in fresh.items():
        assert resumed[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert json.dumps(sorted(resumed)) == json.dumps(sorted(fresh))


def _task_list(live, timeout=600, **query):
    """GET /api/lm_eval/tasks until the index is built (off the request path: the first
    answers say `indexing`); the page of tasks the query finds."""
    from urllib.parse import urlencode

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.monotonic()
        status, body = live.request("GET", f"/api/lm_eval/tasks?{urlencode(query)}")
        assert status == 200, body
        assert time.monotonic() - started < 10, "the search waited for the index"
        if body["data"]["status"] == "ready":
            return body["data"]
        time.sleep(1)
    raise AssertionError("the task list never came")


@pytest.mark.slow
def test_task_list_and_launch_form_search(with_tiny, tasks_dir, page):
    live = LiveServer(with_tiny, {"LBS_LM_EVAL_INCLUDE_PATH": str(tasks_dir),
                                  "HF_DATASETS_OFFLINE": "1"}).start()
    try:
        live.wait_for_worker()
        ds = _task_list(live, names="lbs_gen,lbs_group,arc_easy,hellaswag")
        by_name = {t["name"]: t for t in ds["tasks"]}
        assert by_name["lbs_gen"]["version"] == 2.0
        assert by_name["lbs_gen"]["output_type"] == "generate_until"
        assert by_name["lbs_group"]["kind"] == "group"
        assert by_name["lbs_group"]["tasks"] == ["lbs_mc", "lbs_gen"]
        assert "arc_easy" in by_name and "hellaswag" in by_name  # lm-eval's own index
        # a task the index knows is checked at submit time
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "lm_eval", "params": {"tasks": ["nope_x"]}})
        assert status == 422 and body["error"]["details"][0]["field"] == "params.tasks"

        page.goto(live.url + "/#/launch")
        page.check("#ds-lm_eval")
        fs = page.locator('fieldset[data-dataset="lm_eval"]')
        # tasks not chosen yet: the estimate says what to fill, nothing is marked wrong
        page.locator("#launch-estimate", has_text="Tasks").wait_for()
        assert fs.locator(".field-error").all_inner_texts() == [""] * fs.locator(
            ".field-error").count()
        search = fs.locator("input.list-search")
        for name in ("lbs_mc", "lbs_ppl"):
            search.fill(name)  # suggestions come from GET /api/lm_eval/tasks
            fs.locator(f'datalist option[value="{name}"]').wait_for(state="attached")
            search.dispatch_event("change")
        assert fs.locator('input[name="tasks"]').input_value() == "lbs_mc, lbs_ppl"
        # each chosen task says its data is here (local files next to the YAML)
        fs.locator('.task-state.ready[data-task="lbs_ppl"]').wait_for()
        fs.locator('input[name="tasks"]').fill("lbs_mc, arc_easy")
        fs.locator('.task-state.missing[data-task="arc_easy"]').wait_for()
        assert "data fetch lm_eval --tasks arc_easy" in fs.locator(".task-data").inner_text()
        page.screenshot(path=ARTIFACTS / "lm-eval-task-picker.png", full_page=True)
        fs.locator('input[name="tasks"]').fill("lbs_mc, lbs_ppl")
        fs.locator('input[name="limit"]').fill("2")
        page.click("#launch-submit")
        try:
            page.wait_for_url("**/#/queue")
        except Exception:  # noqa: BLE001 - any wait failure: say what the form said
            errors = [e.inner_text() for e in page.locator(".field-error").all()]
            raise AssertionError(f"{page.locator('#launch-status').inner_text()} {errors}"
                                 f"\n{live.log()[-2000:]}") from None
        (listed,) = live.request("GET", "/api/jobs")[1]["data"]["jobs"]
        job = live.request("GET", f"/api/jobs/{listed['id']}")[1]["data"]["job"]
        assert job["params"]["tasks"] == ["lbs_mc", "lbs_ppl"]
        job = live.wait_for(job["id"], ("succeeded", "failed"), timeout=300)
        assert job["state"] == "succeeded", job["error"]
        page.goto(f"{live.url}/#/job/{job['id']}")
        page.get_by_text("lm-eval results (per task and group)").wait_for()
        body_text = page.locator("body").inner_text()
        assert "bits_per_byte" in body_text and "acc_norm" in body_text
        assert "0.4.13" in body_text
    finally:
        live.stop()


def test_openai_model_answers_through_runner_lm(with_tiny, tasks_dir):
    """An openai: model serves lm-eval's interface too (completions with echo+logprobs for
    the choices, generation with stop strings): on a fake endpoint backed by the same tiny
    model it scores as the local runner does; rolling log-likelihood is refused clearly."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from backend.common.config import load_settings
    from backend.datasets.lm_eval_lm import RunnerLM
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import resolve_model
    from backend.runners.openai.options import ApiOptions
    from backend.runners.openai.runner import OpenAIRunner
    from tests.openai_server import FakeOpenAI

    settings = load_settings()
    local = HFRunner.load(resolve_model("builtin:tiny", settings, confine=False),
                          LoadOptions.from_settings(settings), settings)
    fake = FakeOpenAI(local, api_key="k").start()
    try:
        remote = OpenAIRunner("openai:tiny", "tiny",
                              ApiOptions(base_url=fake.url, endpoint="completions"), "k",
                              local.tok, local.max_length)
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        got = {}
        for name, runner in (("local", local), ("remote", remote)):
            got[name] = lm_eval.simple_evaluate(model=RunnerLM(runner),
                                                tasks=["lbs_mc", "lbs_gen"],
                                                task_manager=manager)["results"]
        assert got["remote"]["lbs_mc"]["acc,none"] == got["local"]["lbs_mc"]["acc,none"]
        assert got["remote"]["lbs_mc"]["acc_norm,none"] == \
            got["local"]["lbs_mc"]["acc_norm,none"]
        assert got["remote"]["lbs_gen"]["exact_match,first_number"] == \
            got["local"]["lbs_gen"]["exact_match,first_number"]
        with pytest.raises(ValueError, match="cannot score whole texts"):
            lm_eval.simple_evaluate(model=RunnerLM(remote), tasks=["lbs_ppl"],
                                    task_manager=manager)
    finally:
        fake.stop()
