"""batch_size "auto" by measured speed (engine.answering.BatchTrial): the first items
are answered at a few sizes up to what fits, each item once, and the fastest size per
unit of work is kept and recorded in the job's manifest with its reason."""

from __future__ import annotations

import pytest

from backend.datasets.base import Item
from backend.engine.answering import BatchTrial, trial_sizes


def _items(n: int, tokens: int = 100) -> list[Item]:
    return [Item(i, "p", tokens, 10, None) for i in range(n)]


def test_trial_sizes_span_one_to_what_fits():
    assert trial_sizes(1) == [1]
    assert trial_sizes(2) == [1, 2]
    assert trial_sizes(16) == [1, 4, 16]
    assert trial_sizes(40) == [1, 4, 16, 40]


@pytest.mark.parametrize("per_item, chosen", [
    ({1: 1.0, 4: 1.5, 16: 2.0}, 1),  # the CPU's case: one row at a time is fastest
    ({1: 1.0, 4: 0.5, 16: 0.3}, 16),
    ({1: 1.0, 4: 0.4, 16: 0.6}, 4),
])
def test_the_fastest_size_per_unit_is_kept(per_item, chosen):
    trial = BatchTrial(16)
    sizes = []
    while trial.chosen is None:
        size = trial.next_size()
        sizes.append(size)
        # the first batch settles first-call costs: its (slow) time does not count
        seconds = 100.0 if len(sizes) == 1 else per_item[size] * size
        trial.record(size, _items(size), seconds)
    assert sizes == [1, 1, 4, 16]
    assert trial.chosen == chosen and trial.next_size() == chosen
    note = trial.note()
    assert note["chosen"] == chosen and note["fits"] == 16
    assert set(note["seconds_per_unit"]) == {"1", "4", "16"}
    assert "fastest" in note["reason"]


def test_work_is_counted_in_tokens_where_items_know_them():
    """A batch of shorter prompts is not taken for a faster size."""
    trial = BatchTrial(2)
    trial.record(1, _items(1), 9.0)  # settling
    trial.record(1, _items(1, tokens=190), 1.0)  # 200 units in 1 s
    trial.record(2, _items(2, tokens=40), 0.5)  # 100 units in 0.5 s: the same speed, +eps
    assert trial.seconds[1] == pytest.approx(1 / 200)
    assert trial.seconds[2] == pytest.approx(0.5 / 100)
    assert trial.chosen in (1, 2)


def test_one_row_that_fits_needs_no_trial():
    trial = BatchTrial(1)
    assert trial.chosen == 1 and trial.next_size() == 1
    assert trial.note()["reason"] == "only one row fits"


def test_an_auto_job_answers_each_item_once_and_records_its_choice(settings, with_tiny):
    from backend.apps.cli import _ListSink
    from backend.engine.evaluation import run_evaluation
    from backend.engine.memory.manager import ModelManager
    from backend.engine.preparation import prepare
    from tests.test_loglikelihood import FIXTURES, _ceval_job

    job = prepare("builtin:tiny", "ceval", {"data_dir": str(FIXTURES), "shots": 1,
                                            "batch_size": "auto"}, settings, confine=False)
    sink = _ListSink()
    sink.set_total = lambda total: None
    run_evaluation(job, ModelManager(use_cache=False), settings, sink)
    records = sorted(sink.records, key=lambda r: r.idx)
    assert [r.idx for r in records] == list(range(5))
    assert all(r.error is None for r in records)
    _, alone = _ceval_job(settings, 1)
    assert [r.prediction for r in records] == [r.prediction for r in alone]
    # 5 questions fit; 1 settles, 1 is timed, then 4 on the 3 left: the job ends first
    note = sink.manifest["inference"]["batch_size"]
    assert note["fits"] == 5 and set(note["seconds_per_unit"]) == {"1", "4"}
    assert note["reason"] == "the job ended before every size was timed"


def test_a_halved_batch_caps_the_candidates():
    """A trial batch that ran out of memory was halved: larger sizes drop out, the
    halved size is the largest candidate, and the trial still ends with a choice."""
    trial = BatchTrial(16)
    trial.record(1, _items(1), 5.0)  # settling
    trial.record(1, _items(1), 1.0)
    assert trial.next_size() == 4
    trial.cap(2)
    assert trial.sizes == [1, 2] and trial.next_size() == 2
    trial.record(2, _items(2), 1.0)
    assert trial.chosen == 2 and trial.note()["fits"] == 2


def _gsm8k_job(settings, tmp_path, extra: dict, questions: int):
    """A GSM8K job over `questions` made-up problems with two shots, 4 new tokens."""
    import json

    from backend.apps.cli import _ListSink
    from backend.engine.evaluation import run_evaluation
    from backend.engine.memory.manager import ModelManager
    from backend.engine.preparation import prepare
    from tests.conftest import ROOT

    data = tmp_path / f"gsm8k-{questions}"
    data.mkdir(exist_ok=True)
    (data / "train.jsonl").write_text((ROOT / "tests/fixtures/gsm8k/train.jsonl").read_text())
    (data / "test.jsonl").write_text("".join(
        json.dumps({"question": f"Ann has {i} apples and buys {i + 3} more. How many now?",
                    "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"}) + "\n"
        for i in range(questions)))
    job = prepare("builtin:tiny", "gsm8k", {"data_dir": str(data), "shots": 2,
                                            "max_new_tokens": 4, **extra},
                  settings, confine=False)
    sink = _ListSink()
    sink.set_total = lambda total: None
    run_evaluation(job, ModelManager(use_cache=False), settings, sink)
    return job, sink


def test_a_job_that_leaves_batch_size_unset_runs_auto_when_it_has_many_items(
        settings, with_tiny, tmp_path):
    """batch_size unset and 64 items or more on a local model: "auto" by default (the
    fastest size timed on the first items, each answered once, noted as the default);
    fewer items, or batch_size 1 sent, run one at a time. The stored parameters keep
    what was sent."""
    from backend.engine.answering import AUTO_BY_DEFAULT_ITEMS

    job, sink = _gsm8k_job(settings, tmp_path, {}, AUTO_BY_DEFAULT_ITEMS)
    assert "batch_size" not in job.params.model_fields_set
    records = sorted(sink.records, key=lambda r: r.idx)
    assert [r.idx for r in records] == list(range(AUTO_BY_DEFAULT_ITEMS))
    note = sink.manifest["inference"]["batch_size"]
    assert note["default"] is True and "by default" in note["reason"]
    # 64 fit (on the CPU at most 64 rows): 1 settles, then 1, 4 and 16 are timed and
    # the 42 left run as the last candidate, 64
    assert set(note["seconds_per_unit"]) == {"1", "4", "16", "64"}
    assert note["chosen"] in (1, 4, 16, 64) and note["fits"] == 64
    _, one = _gsm8k_job(settings, tmp_path, {"batch_size": 1}, AUTO_BY_DEFAULT_ITEMS)
    assert "batch_size" not in one.manifest["inference"]
    assert ([r.prediction for r in sorted(one.records, key=lambda r: r.idx)]
            == [r.prediction for r in records])
    _, few = _gsm8k_job(settings, tmp_path, {}, AUTO_BY_DEFAULT_ITEMS - 1)
    assert "batch_size" not in few.manifest["inference"]


def test_the_default_is_auto_only_where_the_account_can_plan_it():
    """Unset batch_size becomes "auto" for 64 items or more that count their prompts'
    tokens on a runner that sizes batches: not for lm-eval documents (their requests
    are known to the dataset only: the account would plan zero tokens and allow every
    row), not on a remote runner, not where the job sent a size or the dataset has its
    own default. Items already stored count, so a resumed job keeps its choice."""
    from types import SimpleNamespace

    from backend.datasets.base import DatasetParams
    from backend.datasets.needle_in_haystack import NeedleParams
    from backend.engine.answering import AUTO_BY_DEFAULT_ITEMS, default_batch_size
    from backend.runners.hf.runner import HFRunner
    from backend.runners.openai.runner import OpenAIRunner

    local, remote = object.__new__(HFRunner), object.__new__(OpenAIRunner)
    counted = [SimpleNamespace(prompt_tokens=50)] * AUTO_BY_DEFAULT_ITEMS
    documents = [SimpleNamespace(prompt_tokens=0)] * AUTO_BY_DEFAULT_ITEMS
    unset = DatasetParams()
    assert default_batch_size(unset, local, counted) == "auto"
    assert default_batch_size(unset, local, counted[1:]) == 1
    assert default_batch_size(unset, local, documents) == 1
    assert default_batch_size(unset, remote, counted) == 1
    assert default_batch_size(DatasetParams(batch_size=1), local, counted) == 1
    assert default_batch_size(NeedleParams(depth_percents=[0, 50, 100]), local, counted) == 3

