"""LongBench: the official metrics on hand-computed cases, prompts, middle truncation."""

from __future__ import annotations

import pytest

from backend.datasets.longbench import (
    NO_CHAT_TEMPLATE,
    SUBSETS,
    LongBench,
    length_bucket,
    truncate_middle,
)
from backend.datasets.longbench.metrics import (
    classification_score,
    code_sim_score,
    count_score,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    score_sample,
)
from backend.runners.hf.tokenizer import HFTokenizer
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "longbench"


def test_21_subsets_with_official_lengths_and_metrics():
    assert len(SUBSETS) == 21
    assert SUBSETS["gov_report"]["max_new_tokens"] == 512
    assert SUBSETS["hotpotqa"]["max_new_tokens"] == 32
    assert SUBSETS["multifieldqa_zh"]["metric"] == "qa_f1_zh"
    assert SUBSETS["lsht"]["metric"] == "classification"
    assert SUBSETS["repobench-p"]["prompt"].endswith("{context}{input}Next line of code:\n")
    assert NO_CHAT_TEMPLATE == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}


def test_qa_f1():
    # normalised: "harbour board built it" vs "harbour board": P=2/4, R=2/2 -> F1=2/3
    assert qa_f1_score("The harbour board built it.", "the harbour board") == pytest.approx(2 / 3)
    assert qa_f1_score("", "1873") == 0.0
    assert qa_f1_score("1873", "1873") == 1.0


def test_qa_f1_zh_uses_words_not_characters():
    assert qa_f1_zh_score("一八七三年", "一八七三年。") == 1.0
    assert qa_f1_zh_score("", "一八七三年") == 0.0
    assert 0.0 < qa_f1_zh_score("灯塔建于一八七三年", "一八七三年") < 1.0


def test_rouge_l():
    # LCS "alpha beta" = 2 of 4 tokens on each side -> P = R = F = 0.5
    assert rouge_score("alpha beta gamma delta", "alpha beta omega sigma") == \
        pytest.approx(0.5, abs=1e-6)
    assert rouge_score("", "a summary") == 0.0
    assert rouge_zh_score("会议讨论了预算", "会议讨论了预算") == pytest.approx(1.0, abs=1e-6)


def test_classification_official_behaviour():
    classes = ["City", "Individual", "Other location", "Country"]
    assert classification_score("City", "City", all_classes=classes) == 1.0
    assert classification_score("City or Country", "City", all_classes=classes) == 0.5
    # "location" is not a class; "Other location" named in full counts
    assert classification_score("Other location", "Other location", all_classes=classes) == 1.0
    assert classification_score("No idea", "City", all_classes=classes) == 0.0


def test_count_retrieval_and_code():
    assert count_score("There are 2 unique paragraphs", 2) == 1.0
    assert count_score("2 or 3", 2) == 0.5
    assert count_score("none", 2) == 0.0
    assert retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
    assert retrieval_score("Paragraph 7 or 9", "Paragraph 7") == 0.5
    assert retrieval_zh_score("段落3", "段落3") == 1.0
    assert code_sim_score("```python\n    return a - b\n", "    return a - b") == 1.0
    # the comment line is skipped; "return a-b" needs 6 insertions to become
    # "    return a - b": 1 - 6 / (10 + 16) = 0.769 -> 77%
    assert code_sim_score("# comment\nreturn a-b", "    return a - b") == pytest.approx(0.77)


def test_best_over_several_answers_and_first_line():
    assert score_sample("qa_f1", "harbour board", ["1873", "harbour board"]) == 1.0
    assert score_sample("rouge", "Short summary.\nMore text here", ["Short summary."],
                        first_line=True) == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_tok(builtin_models_dir):
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(builtin_models_dir / "builtin-tiny-v1"),
                       max_length=8192)


def test_middle_truncation_keeps_both_ends(tiny_tok):
    text = "BEGINNING " + "filler words here. " * 400 + "THE END"
    cut = truncate_middle(text, tiny_tok, 100)
    assert cut.startswith("BEGINNING") and cut.endswith("THE END")
    assert len(tiny_tok.encode(cut)) <= 102
    assert truncate_middle("short", tiny_tok, 100) == "short"


def test_items_prompts_and_templates(tiny_tok):
    ds = LongBench()
    params = ds.parse_params({"data_dir": str(FIXTURES), "max_length": 300})
    items = ds.build_items(params, tiny_tok)
    by_subset = {}
    for item in items:
        by_subset.setdefault(item.fields["subset"], []).append(item)
    assert set(by_subset) == {"hotpotqa", "multifieldqa_zh", "trec", "passage_count", "lcc"}
    hot = by_subset["hotpotqa"][0]
    assert hot.prompt.startswith("<s><|user|>\nAnswer the question based on the given passages.")
    assert hot.prompt.rstrip().endswith("Answer:<|end|>\n<|assistant|>")
    assert hot.prompt_tokens <= 300 + 64 and hot.max_new_tokens == 32
    trec = by_subset["trec"][0]
    assert not trec.prompt.startswith("<s>")  # few-shot subsets go in without the template
    assert ds.score(trec, "City\nand more lines") == 1.0  # first line only
    assert ds.score(by_subset["passage_count"][0], "2") == 1.0


def test_longbench_e_buckets(tiny_tok):
    ds = LongBench()
    items = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES), "use_e": True,
                                            "max_length": 300}), tiny_tok)
    scored = [(i.fields, 1.0 if i.fields["_id"] == "e1" else 0.0) for i in items]
    entries = ds.aggregate(scored)
    buckets = {e.labels["bucket"]: e.value for e in entries if e.name == "bucket"}
    assert buckets == {"0-4k": 1.0, "4-8k": 0.0, "8k+": 0.0}
    assert [length_bucket(n) for n in (3999, 4000, 7999, 8000)] == ["0-4k", "4-8k", "4-8k", "8k+"]


def test_plain_longbench_has_no_length_buckets(tiny_tok):
    """The buckets are LongBench-E's breakdown: a job on the plain files (whose rows
    carry a length too) has none, so its page shows no buckets table."""
    ds = LongBench()
    items = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES), "max_length": 300}),
                           tiny_tok)
    assert any(i.fields.get("length") is not None for i in items)
    fields = [{**i.fields, **ds.explain(i, "")} for i in items]
    assert not any("bucket" in f for f in fields)
    assert [e for e in ds.aggregate([(f, 1.0) for f in fields]) if e.name == "bucket"] == []


def test_prompts_and_lengths_are_the_official_text_byte_for_byte():
    """subsets.json against copies of LongBench's config/dataset2prompt.json and
    dataset2maxlen.json (tests/fixtures/longbench_official): narrativeqa's official
    text reads "asconcisely", and that typo is what the model must see."""
    import json

    official = ROOT / "tests" / "fixtures" / "longbench_official"
    prompts = json.loads((official / "dataset2prompt.json").read_text(encoding="utf-8"))
    lengths = json.loads((official / "dataset2maxlen.json").read_text(encoding="utf-8"))
    assert set(prompts) == set(SUBSETS) == set(lengths)
    for name, spec in SUBSETS.items():
        assert spec["prompt"].encode("utf-8") == prompts[name].encode("utf-8"), name
        assert spec["max_new_tokens"] == lengths[name], name
    assert "Answer the question asconcisely as you can" in SUBSETS["narrativeqa"]["prompt"]
