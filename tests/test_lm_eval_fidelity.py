"""lm-eval tasks beyond the happy path, against `lm_eval.simple_evaluate` with its HF
backend on the built-in model (local task YAMLs, no network): prompts longer than the
context cut from the left as lm-eval cuts them (and counted), every filter's answer
kept per document, a task's repeats each scored, sampling refused clearly."""

from __future__ import annotations

import pytest

from tests.test_lm_eval import _metrics, _ours


def _reference(with_tiny, tasks_dir, tasks: list[str], **model_args):
    import lm_eval
    from lm_eval.tasks import TaskManager

    chat = model_args.pop("__chat__", {})
    model = with_tiny / "models" / "builtin-tiny-v1"
    args = ",".join(f"{k}={v}" for k, v in {"pretrained": model, "dtype": "float32",
                                             **model_args}.items())
    return lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=tasks, device="cpu", batch_size=1,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        log_samples=True, **chat)


def _assert_same_metrics(ref, outcome) -> None:
    ours = _metrics(outcome.scores)
    expected = {}
    for task, values in ref["results"].items():
        for key, value in values.items():
            if "," in key and "_stderr," not in key:
                metric, _, filt = key.partition(",")
                stderr = values[f"{metric}_stderr,{filt}"]
                expected[(task, key)] = (value, None if stderr == "N/A" else stderr)
    assert set(ours) == set(expected)
    for key, (value, stderr) in expected.items():
        assert ours[key][0] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        if stderr is None:
            assert ours[key][1] is None, key
        else:
            assert ours[key][1] == pytest.approx(stderr, rel=1e-6, abs=1e-6), key


def test_prompts_longer_than_the_context_are_cut_as_lm_eval_cuts_them(with_tiny, tasks_dir):
    """5-shot choices and 3-shot generations on a 48-token context: lm-eval keeps the
    last 49 tokens of context and continuation, and the generation prompt's last
    48 - 12 tokens; the same log-likelihoods, generations, each filter's answer and
    metrics here, and every cut document says by how much. A task with `repeats: 2`
    (a majority vote over its two answers) beside them fits and scores as lm-eval's."""
    tasks = ["lbs_gen_long", "lbs_gen_repeats", "lbs_mc_long"]
    ref = _reference(with_tiny, tasks_dir, tasks, max_length=48)
    outcome, sink = _ours(tasks, {"max_length": 48})
    _assert_same_metrics(ref, outcome)
    rows = {(r.fields["task"], r.fields["doc_id"]): r for r in sink.records}
    assert len(rows) == 16
    for s in ref["samples"]["lbs_gen_repeats"]:
        row = rows[("lbs_gen_repeats", s["doc_id"])]
        assert s["resps"][0] == [row.fields["raw"]] * 2
        assert row.fields["answers"][s["filter"]] == s["filtered_resps"][0]
        assert row.fields["truncated_tokens"] == 0
    for s in ref["samples"]["lbs_mc_long"]:
        row = rows[("lbs_mc_long", s["doc_id"])]
        for got, want in zip(row.fields["resps"], s["resps"], strict=True):
            assert got[0] == pytest.approx(float(want[0][0]), abs=1e-5)
        assert row.fields["truncated_tokens"] > 0
    for s in ref["samples"]["lbs_gen_long"]:  # one entry per document and filter
        row = rows[("lbs_gen_long", s["doc_id"])]
        assert row.fields["raw"] == s["resps"][0][0]
        assert row.fields["answers"][s["filter"]] == s["filtered_resps"][0]
        assert row.fields["truncated_tokens"] > 0
    assert {s["filter"] for s in ref["samples"]["lbs_gen_long"]} == {
        "strict-match", "flexible-extract"}
    cut = {s.name: s.value for s in outcome.scores if s.name.startswith("truncated")}
    assert cut["truncated_prompts"] == 11
    assert cut["truncated_tokens_max"] == max(r.fields["truncated_tokens"]
                                              for r in sink.records)


def test_chat_template_and_fewshot_as_multiturn_render_as_lm_eval(with_tiny, tasks_dir):
    """apply_chat_template with the few-shot examples as turns and a system instruction,
    on the built-in model (which has a chat template): the prompts lm-eval renders, the
    same log-likelihoods, generations and metrics; the job records the three."""
    tasks = ["lbs_gen_long", "lbs_mc_long"]
    chat = {"apply_chat_template": True, "fewshot_as_multiturn": True,
            "system_instruction": "Answer briefly."}
    ref = _reference(with_tiny, tasks_dir, tasks, **{"__chat__": chat})
    outcome, sink = _ours(tasks, chat)
    _assert_same_metrics(ref, outcome)
    rows = {(r.fields["task"], r.fields["doc_id"]): r for r in sink.records}
    for s in ref["samples"]["lbs_mc_long"]:
        row = rows[("lbs_mc_long", s["doc_id"])]
        assert row.prompt == s["arguments"][0][0]
        assert row.prompt.startswith("<s><|system|>\nAnswer briefly.")
        assert row.prompt.count("<|assistant|>") == 6  # five examples as turns, the question
        for got, want in zip(row.fields["resps"], s["resps"], strict=True):
            assert got[0] == pytest.approx(float(want[0][0]), abs=1e-5)
    for s in ref["samples"]["lbs_gen_long"]:
        row = rows[("lbs_gen_long", s["doc_id"])]
        assert row.prompt == s["arguments"][0][0]
        assert row.fields["raw"] == s["resps"][0][0]
    assert sink.manifest["task"]["params"]["apply_chat_template"] is True


def test_sampling_is_refused_not_ignored(with_tiny, tasks_dir):
    """Decoding is greedy: sampling asked for in the job's gen_kwargs is refused at
    submission, and a task whose own generation_kwargs sample is refused by name
    before anything runs, never decoded greedily instead."""
    from backend.datasets.registry import get_dataset
    from backend.engine.contracts import ParamError

    dataset = get_dataset("lm_eval")
    for kwargs in ({"do_sample": True}, "temperature=0.7", {"top_p": 0.9, "do_sample": True}):
        with pytest.raises(Exception, match="greedy"):
            dataset.parse_params({"tasks": ["lbs_gen"], "gen_kwargs": kwargs})
    with pytest.raises(ParamError, match="lbs_gen_sampled.*do_sample"):
        _ours(["lbs_gen_sampled"])


@pytest.mark.slow
def test_job_page_counts_cut_prompts_and_shows_every_filter(with_tiny, tasks_dir, page):
    import csv
    import io
    import json
    import urllib.request

    from tests.conftest import ARTIFACTS, LiveServer

    live = LiveServer(with_tiny, {"LBS_LM_EVAL_INCLUDE_PATH": str(tasks_dir),
                                  "HF_DATASETS_OFFLINE": "1"}).start()
    try:
        live.wait_for_worker()
        status, body = live.request("POST", "/api/jobs", {
            "model": "builtin:tiny", "dataset": "lm_eval",
            "params": {"tasks": ["lbs_gen_long"], "limit": 2, "max_length": 48}})
        assert status == 201, body
        job = live.wait_for(body["data"]["job"]["id"], ("succeeded", "failed"), timeout=300)
        assert job["state"] == "succeeded", job["error"]
        assert job["scores"]["truncated_prompts"] == 2
        page.goto(f"{live.url}/#/job/{job['id']}")
        figures = page.locator('[data-breakdown="truncation"]')
        figures.wait_for()
        assert figures.locator('dd[data-key="truncated_prompts"] strong').inner_text() == "2"
        cell = page.locator('#samples-table td[data-col="answers"]').first
        assert cell.locator("dt").all_inner_texts() == ["strict-match", "flexible-extract"]
        cut = page.locator('#samples-table td[data-col="truncated_tokens"]').first.inner_text()
        assert int(cut) > 0
        page.screenshot(path=ARTIFACTS / "lm-eval-truncation.png", full_page=True)
        with urllib.request.urlopen(f"{live.url}/api/jobs/{job['id']}/export?format=csv") as res:
            text = res.read().decode()
        rows = list(csv.DictReader(io.StringIO(text)))
        assert set(json.loads(rows[0]["answers"])) == {"strict-match", "flexible-extract"}
        assert int(rows[0]["truncated_tokens"]) == int(cut)
    finally:
        live.stop()
