"""LongBench v2: official prompt, answer extraction, accuracy by difficulty and length."""

from __future__ import annotations

import pytest

from backend.datasets.longbench_v2 import LongBenchV2, extract_choice
from backend.runners.hf.tokenizer import HFTokenizer
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "longbench_v2"


@pytest.mark.parametrize("reply, choice", [
    ("The correct answer is (B)", "B"),
    ("**The correct answer is (C)**", "C"),
    ("After reading, The correct answer is D.", "D"),
    ("I think it is (B)", ""),
    ("", ""),
])
def test_extract_choice(reply, choice):
    assert extract_choice(reply) == choice


@pytest.fixture(scope="module")
def tok(builtin_models_dir):
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(builtin_models_dir / "builtin-tiny-v1"),
                       max_length=8192)


def test_prompt_truncation_and_filters(tok):
    ds = LongBenchV2()
    items = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES), "max_length": 300}), tok)
    assert len(items) == 3
    first = items[0].prompt
    assert "Please read the following text and answer the question below.\n\n<text>\n" in first
    assert ("What is the correct answer to this question: How often did the harbour board "
            "meet?\nChoices:\n(A) Daily\n(B) Weekly\n(C) Monthly\n(D) Yearly\n\n"
            "Format your response") in first
    assert items[0].prompt_tokens <= 300 + 64 and items[0].max_new_tokens == 128
    hard = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES), "max_length": 300,
                                           "difficulty": "hard"}), tok)
    assert [i.fields["_id"] for i in hard] == ["v2", "v3"]


def test_cot_has_an_answer_turn(tok):
    ds = LongBenchV2()
    (item, *_) = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES), "cot": True,
                                                 "max_length": 300}), tok)
    assert item.prompt.rstrip().endswith("Let’s think step by step:<|end|>\n<|assistant|>")
    assert item.max_new_tokens == 1024
    second = ds.second_turn(item, "They met each week.", tok)
    assert "The text is too long and omitted here." in second.prompt
    assert "Let’s think step by step: They met each week.\n\nBased on the above" in second.prompt
    assert second.max_new_tokens == 128 and second.fields["cot"] == "They met each week."


def test_accuracy_by_difficulty_and_length():
    ds = LongBenchV2()
    scored = [({"difficulty": "easy", "length": "short"}, 1.0),
              ({"difficulty": "hard", "length": "medium"}, 0.0),
              ({"difficulty": "hard", "length": "long"}, 1.0)]
    got = {(e.name, tuple(e.labels.values())): e.value for e in ds.aggregate(scored)}
    assert got[("overall", ())] == pytest.approx(2 / 3)
    assert got[("difficulty", ("easy",))] == 1.0 and got[("difficulty", ("hard",))] == 0.5
    assert got[("length", ("medium",))] == 0.0 and got[("length", ("long",))] == 1.0
