"""MR-GSM8K: official reply parsing and the MR-Score components computed by hand."""

from __future__ import annotations

import pytest

from backend.datasets.base import Item
from backend.datasets.mr_gsm8k import MRGSM8K, judged, mcc, parse_reply, step_number
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "mr_gsm8k"

REPLY = ("Step-by-step Evaluation: step 1 adds.\nFinal Judgement: **wrong**\n"
         "First Error Step: step 1\nError Analysis: addition instead of multiplication")


def test_parse_reply_and_quirks():
    got = parse_reply(REPLY)
    assert got == {"judgement": "**wrong**", "error_step": "step 1",
                   "error_reason": "addition instead of multiplication"}
    assert parse_reply("no format at all") == {"judgement": "", "error_step": "",
                                               "error_reason": ""}
    assert judged("wrong", "**wrong**") and judged("wrong", "Incorrect")
    assert judged("correct", "**correct**") and not judged("correct", "wrong")
    assert judged("correct", "incorrect") is False  # "incorrect" alone becomes "wrong"
    assert [step_number(s) for s in ("2", "Step 3", "N/A", "")] == ["2", "3", "", ""]


def test_mcc_by_hand():
    assert mcc(5, 5, 0, 0) == 1.0
    assert mcc(0, 0, 5, 5) == -1.0
    # tp=3 tn=2 fp=1 fn=1: (6-1)/sqrt(4*4*3*3) = 5/12
    assert mcc(3, 2, 1, 1) == pytest.approx(5 / 12)
    assert mcc(0, 0, 0, 4) == 0.0


def _item(truth, step):
    return Item(idx=0, prompt="", prompt_tokens=0, max_new_tokens=8,
                reference={"correctness": truth, "error_step": step},
                fields={"truth": truth, "error_step": step})


def test_scores_and_mr_score_components():
    ds = MRGSM8K()
    cases = [(_item("wrong", "1"), REPLY),                      # judged wrong, right step
             (_item("wrong", "2"), REPLY),                      # judged wrong, wrong step
             (_item("correct", "N/A"), "Final Judgement: correct\nFirst Error Step: N/A\n"
                                       "Error Analysis: N/A"),  # tp
             (_item("correct", "N/A"), REPLY)]                  # fn
    # as the evaluation loop stores them: the item's fields, a copy, with explain() merged
    scored = [({**item.fields, **ds.explain(item, reply)}, ds.score(item, reply))
              for item, reply in cases]
    assert all(item.fields.keys() == {"truth", "error_step"} for item, _ in cases)
    assert [v for _, v in scored] == [1.0, 1.0, 1.0, 0.0]
    got = {e.name: e.value for e in ds.aggregate(scored)}
    expected_mcc = mcc(1, 2, 0, 1)  # (2 - 0) / sqrt(1*2*2*3)
    assert got["mcc"] == pytest.approx(expected_mcc)
    assert got["step_accuracy"] == 0.5
    assert got["mr_score_without_reason"] == pytest.approx(0.2 * expected_mcc + 0.3 * 0.5)
    assert got["overall"] == 0.75
    first = scored[0][0]
    assert first["reference"] == {"correctness": "wrong", "error_step": "1"}
    assert first["extracted"] == "1" and first["step_ok"] is True
    assert first["why"] == "judged **wrong**, the solution is wrong"


def test_official_prompt():
    class Plain:
        max_length = 4096

        def render(self, m):
            return m

        def count_prompt(self, p):
            return len(p)

    ds = MRGSM8K()
    items = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES)}), Plain())
    assert items[1].prompt.startswith("Act as a grade school math teacher and score the "
                                      "following problem solution.\n\nQuestion:\nA garden")
    assert "Student Solution:\nStep 1: 4 + 9 = 13\nStep 2: The answer is 13\n\n" in items[1].prompt
    assert items[1].reference == {"correctness": "wrong", "error_step": "1"}
