"""C-Eval: official prompt, letter log-likelihood scoring, per-subject/category accuracy."""

from __future__ import annotations

import pytest
import torch

from backend.datasets.base import DataContext
from backend.datasets.ceval import SUBJECTS, CEval, extract_letter
from backend.engine.contracts import LoglikelihoodRequest, ParamError
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "ceval"


def test_52_subjects_in_four_categories():
    assert len(SUBJECTS) == 52
    counts = {}
    for _, category in SUBJECTS.values():
        counts[category] = counts.get(category, 0) + 1
    assert counts == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}


class PlainTokenizer:
    max_length = 4096

    def render(self, message):
        return message

    def count_prompt(self, prompt):
        return len(prompt)


def test_official_prompt_with_shots():
    ds = CEval()
    items = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES), "shots": 1,
                                            "subjects": ["high_school_physics"]}),
                           PlainTokenizer())
    assert len(items) == 3
    assert items[1].prompt == (
        "以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n\n"
        "光在真空中的传播速度约为多少？\nA. 3×10^5 m/s\nB. 3×10^8 m/s\nC. 3×10^10 m/s\n"
        "D. 340 m/s\n答案：B\n\n"
        "电阻的国际单位是？\nA. 安培\nB. 伏特\nC. 欧姆\nD. 瓦特\n答案：")
    assert items[1].reference == "C" and items[1].choices == ["A", "B", "C", "D"]
    assert items[1].fields == {"subject": "high_school_physics", "category": "STEM", "id": "1"}


def test_missing_data_says_where_it_looked(tmp_path):
    ds = CEval(DataContext(datasets_dir=tmp_path))
    with pytest.raises(ParamError) as err:
        ds.check(ds.parse_params({}), None)
    assert err.value.field == "data_dir" and str(tmp_path / "ceval") in err.value.message
    with pytest.raises(ParamError) as err:
        ds.check(ds.parse_params({"data_dir": str(FIXTURES), "subjects": ["logic"]}), None)
    assert err.value.field == "subjects" and "logic" in err.value.message
    with pytest.raises(ValueError):
        ds.parse_params({"subjects": ["astrology"]})


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("答案是C。", "C"), (" d) because", "D"), ("不知道", ""), ("", ""),
    # a standalone option letter, not the first A-D of the upper-cased reply
    ("Correct option: D", "D"), ("I choose A", "A"), ("The answer is B.", "B"),
    ("Answer: (C)", "C"), ("答案：D", "D"), ("选B", "B"), ("我认为正确答案是 A 选项", "A"),
    ("A. 安培", "A"), ("Because of this, D", "D"), ("Clearly B", "B"),
    ("Can't decide", ""), ("BAD", "")])
def test_extract_letter(reply, letter):
    assert extract_letter(reply) == letter


def test_aggregate_by_hand():
    ds = CEval()
    scored = [({"subject": "high_school_physics"}, 1.0), ({"subject": "high_school_physics"}, 0.0),
              ({"subject": "law"}, 1.0), ({"subject": "logic"}, 0.0)]
    entries = {(e.name, tuple(e.labels.values())): e for e in ds.aggregate(scored)}
    assert entries[("overall", ())].value == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # macro
    assert entries[("micro", ())].value == pytest.approx(0.5)
    assert entries[("category", ("STEM",))].value == pytest.approx(0.5)
    assert entries[("category", ("Humanities",))].value == pytest.approx(0.5)  # law 1, logic 0
    # a category's count is its questions, as every other count on the page
    assert entries[("category", ("STEM",))].count == 2
    assert entries[("category", ("Humanities",))].count == 2
    assert entries[("overall", ())].count == 4
    assert entries[("subject", ("law", "Humanities"))].value == 1.0


@pytest.fixture(scope="module")
def tiny_runner(builtin_models_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backend.engine.contracts import ModelSpec
    from backend.runners.hf.runner import HFRunner

    folder = builtin_models_dir / "builtin-tiny-v1"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return HFRunner(ModelSpec("tiny", folder), model, AutoTokenizer.from_pretrained(folder),
                    "cpu", 8192)


def test_loglikelihood_matches_separate_full_passes(tiny_runner):
    ctx = "以下是单项选择题。\n答案："
    requests = [LoglikelihoodRequest(ctx, c) for c in ("A", "B", "C", "D")] + \
        [LoglikelihoodRequest("The river runs", " past the old mill"),
         LoglikelihoodRequest("The river runs", " dry")]
    requests = [LoglikelihoodRequest(r.context, r.continuation, chat_template=False)
                for r in requests]
    got = tiny_runner.loglikelihood(requests)
    for request, result in zip(requests, got, strict=True):
        ctx_ids, cont = tiny_runner._split(request)
        ids = torch.tensor([ctx_ids + cont])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_runner.model(ids).logits[0].float(), -1)
        expected = sum(float(logp[len(ctx_ids) - 1 + j, t]) for j, t in enumerate(cont))
        assert result.logprob == pytest.approx(expected, abs=1e-4)
        assert result.tokens == len(cont)


def test_the_most_likely_letter_is_chosen_under_known_weights(tiny_runner):
    """Weights set by hand: every token embeds to the same vector e, the blocks add
    nothing, and the output row of "C" is e while the others are 0 (A, B, D) or -e.
    Whatever the prompt, C has the highest log-probability and must be chosen."""
    import copy

    from backend.datasets.ceval import LETTERS
    from backend.engine.answering import choose
    from backend.runners.base import PromptView
    from backend.runners.hf.runner import HFRunner

    model = copy.deepcopy(tiny_runner.model)
    tok = tiny_runner.tokenizer
    with torch.no_grad():
        e = torch.linspace(0.5, 1.5, model.config.hidden_size)
        model.model.embed_tokens.weight[:] = e
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight[:] = -e
        for letter in ("A", "B", "D"):
            model.lm_head.weight[tok.convert_tokens_to_ids(letter)] = 0.0
        model.lm_head.weight[tok.convert_tokens_to_ids("C")] = e
    runner = HFRunner(tiny_runner.spec, model, tok, "cpu", 8192)
    ds = CEval()
    params = ds.parse_params({"data_dir": str(FIXTURES)})
    items = ds.build_items(params, PromptView(runner, params.use_chat_template))
    assert len(items) == 5
    for item in items:
        prediction, _, _, fields = choose(runner, item, params.use_chat_template)
        assert prediction == "C"
        assert max(fields["logprobs"], key=fields["logprobs"].get) == "C"
        assert set(fields["logprobs"]) == set(LETTERS)
    scores = [ds.score(item, "C") for item in items]
    assert scores == [1.0 if item.reference == "C" else 0.0 for item in items]
