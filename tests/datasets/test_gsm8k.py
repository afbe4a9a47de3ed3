"""GSM8K: answer extraction and prompt construction on the official JSONL layout."""

from __future__ import annotations

import pytest

from backend.datasets.gsm8k import GSM8K, extract_answer, reference_answer
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "gsm8k"


@pytest.mark.parametrize("reply, number", [
    ("12 + 15 = 27 loaves.\n#### 27", "27"),
    ("So the total is 1,200 dollars. The answer is 1,250.", "1250"),
    ("She pays $18.00 in all.", "18"),
    ("It drops by -4 degrees, so -4", "-4"),
    ("About 2.5 hours", "2.5"),
    ("First 3, then 4, finally 7.\n\nQuestion: Another one 99", "7"),
    ("I do not know.", ""),
    ("", ""),
])
def test_extract_answer(reply, number):
    assert extract_answer(reply) == number


def test_reference_answer():
    assert reference_answer("1,200 - 450 = <<1200-450=750>>750 nails remain.\n#### 750") == "750"
    assert reference_answer("#### 1,000") == "1000"


class PlainTokenizer:
    max_length = 4096

    def render(self, message):
        return message

    def count_prompt(self, prompt):
        return len(prompt.split())


def test_prompt_with_shots_and_score():
    ds = GSM8K()
    items = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES), "shots": 2,
                                            "max_samples": 2}), PlainTokenizer())
    assert len(items) == 2
    assert items[0].prompt.startswith("Question: Sara reads 3 chapters")
    assert "#### 750\n\nQuestion: A baker makes 12 loaves" in items[0].prompt
    assert items[0].prompt.endswith("How many loaves does she make in a day?\nAnswer:")
    assert items[1].reference == "32"
    assert ds.score(items[1], "50 - 18 = 32. The answer is 32.") == 1.0
    assert ds.score(items[1], "The answer is 33.") == 0.0
