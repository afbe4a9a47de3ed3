"""Every built-in dataset declares how its scores break down and what a sample shows;
the declarations must point at what its aggregate and explain() really produce."""

from __future__ import annotations

import pytest

from backend.apps.api.schemas import scores_dict
from backend.datasets.base import DataContext
from backend.datasets.registry import dataset_names, get_dataset
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"


class Plain:
    max_length = 4096

    def encode(self, text):
        return list(range(len(text.split())))

    def decode(self, ids):
        return " ".join("w" for _ in ids)

    def render(self, message):
        return message

    def count_prompt(self, prompt):
        return len(prompt.split())


def _gold(item) -> str:
    """A reply that the dataset should score right."""
    ref = item.reference
    if isinstance(ref, dict) and "answers" in ref:
        return ref["answers"][0]
    if isinstance(ref, dict):  # MR-GSM8K
        return (f"Final Judgement: {ref['correctness']}\nFirst Error Step: "
                f"{ref['error_step']}\nError Analysis: x")
    if item.fields.get("difficulty"):  # LongBench v2
        return f"The correct answer is ({ref})"
    return str(ref)


PARAMS = {"ceval": {}, "gsm8k": {}, "longbench": {"subsets": ["hotpotqa", "trec"]},
          "longbench-e": {"subsets": ["hotpotqa"], "use_e": True},
          "longbench_v2": {}, "mr_gsm8k": {},
          "needle_in_haystack": {"context_lengths": [256], "depth_percents": [0, 100]}}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_breakdowns_point_into_the_scores(name):
    ds = get_dataset(name.split("-")[0], DataContext(datasets_dir=FIXTURES))
    items = ds.build_items(ds.parse_params(PARAMS[name]), Plain())
    scored = []
    for item in items:
        reply = _gold(item)
        fields = {**item.fields, **ds.explain(item, reply)}
        assert "reference" in fields, "every sample keeps its reference"
        scored.append((fields, ds.score(item, reply)))
    scores = scores_dict(ds.aggregate(scored))
    described = ds.describe()
    assert described["breakdowns"], f"{name} declares no breakdown"
    for part in described["breakdowns"]:
        if part["kind"] == "figures":
            for row in part["rows"]:
                assert isinstance(scores[row["key"]], float), (name, row["key"])
        elif part["key"] == "buckets" and not PARAMS[name].get("use_e"):
            assert "buckets" not in scores  # LongBench-E's length buckets: use_e only
        else:
            rows = scores[part["key"]]
            assert rows and all("score" in r and "count" in r for r in rows)
            for column in part.get("columns", []):
                assert all(column["key"] in r for r in rows), (name, column["key"])
    for column in described["sample_columns"]:
        if column["key"] == "logprobs":  # added by the evaluation loop (multiple choice)
            continue
        if column["key"] == "bucket" and not PARAMS[name].get("use_e"):
            continue  # LongBench-E's length bucket: use_e only
        assert any(column["key"] in f for f, _ in scored), (name, column["key"])
    assert name.split("-")[0] in dataset_names()


def test_gsm8k_counts_the_extraction_that_matched():
    ds = get_dataset("gsm8k", DataContext(datasets_dir=FIXTURES))
    items = ds.build_items(ds.parse_params({}), Plain())[:3]
    replies = [f"#### {items[0].reference}", f"so it is {items[1].reference}", "no idea"]
    scored = [({**i.fields, **ds.explain(i, r)}, ds.score(i, r))
              for i, r in zip(items, replies, strict=True)]
    assert [f["extraction"] for f, _ in scored] == ["####", "last number", "none"]
    assert scored[2][0]["why"].startswith("no number in the reply")
    rows = {r["extraction"]: r for r in scores_dict(ds.aggregate(scored))["extractions"]}
    one = rows.pop("####")
    low, high = one.pop("ci95")
    # one right answer of one: no spread in the sample, a wide Wilson interval
    z2 = 1.959963984540054 ** 2
    assert low == pytest.approx((1 + z2 / 2 - (z2 * z2 / 4) ** 0.5) / (1 + z2)) and high == 1.0
    assert one == {"extraction": "####", "score": 1.0, "count": 1, "stderr": 0.0,
                   "few_items": True}
    assert rows["none"]["score"] == 0.0


def test_ceval_macro_and_micro_differ_by_subject_size():
    ds = get_dataset("ceval", DataContext(datasets_dir=FIXTURES))
    items = ds.build_items(ds.parse_params({}), Plain())
    # everything right in one subject, everything wrong in the other
    first = items[0].fields["subject"]
    scored = [({**i.fields, **ds.explain(i, i.reference if i.fields["subject"] == first
                                         else "Z")},
               1.0 if i.fields["subject"] == first else 0.0) for i in items]
    scores = scores_dict(ds.aggregate(scored))
    n_first = sum(i.fields["subject"] == first for i in items)
    assert scores["overall"] == pytest.approx(0.5)  # mean over two subjects
    assert scores["micro"] == pytest.approx(n_first / len(items))
    assert scored[-1][0]["extracted"] == "" and "no letter" in scored[-1][0]["why"]
