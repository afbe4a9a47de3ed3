"""Needle-in-a-Haystack: prompt construction in the model's own tokens, and scoring."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from backend.datasets.needle_in_haystack import (
    DEFAULT_ANSWER,
    DEFAULT_NEEDLE,
    NeedleInAHaystack,
    NeedleParams,
    normalize,
    score_answer,
    split_sentences,
)
from backend.engine.contracts import ModelInfo, ParamError
from backend.runners.hf.tokenizer import HFTokenizer

DOC = re.compile(r"<document>\n(.*)\n</document>", re.S)


@pytest.fixture(scope="module")
def tiny_tokenizer(builtin_models_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_models_dir / "builtin-tiny-v1")
    assert tok.chat_template, "the built-in tokenizer ships a chat template"
    return HFTokenizer(tok, max_length=8192)


@pytest.fixture(scope="module")
def wordpiece_tokenizer():
    """A differently built tokenizer: lower-casing WordPiece, [CLS]/[SEP] added, no template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from backend.runners.builtin import CORPUS

    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
    core.train([str(CORPUS)], trainers.WordPieceTrainer(vocab_size=900, special_tokens=special,
                                                        show_progress=False))
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", core.token_to_id("[CLS]")),
                                                 ("[SEP]", core.token_to_id("[SEP]"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", pad_token="[PAD]")
    view = HFTokenizer(tok, max_length=4096)
    assert not view.use_chat_template
    return view


def build(tokenizer, **params):
    ds = NeedleInAHaystack()
    return ds.build_items(ds.parse_params(params), tokenizer)


def needle_position(tokenizer, prompt: str, needle: str) -> float:
    """Percent of the document's tokens that come before the needle, measured afresh."""
    document = DOC.search(prompt).group(1)
    before, _, after = document.partition(needle)
    n_before = len(tokenizer.encode(before.strip()))
    n_after = len(tokenizer.encode(after.strip()))
    return 100 * n_before / (n_before + n_after)


@pytest.mark.parametrize("tok_name", ["tiny_tokenizer", "wordpiece_tokenizer"])
def test_prompts_fill_budget_and_place_needle(tok_name, request):
    tokenizer = request.getfixturevalue(tok_name)
    lengths, depths = [512, 1024, 3000], [0, 10, 25, 50, 75, 90, 100]
    items = build(tokenizer, context_lengths=lengths, depth_percents=depths)
    assert len(items) == len(lengths) * len(depths)
    assert [i.idx for i in items] == list(range(len(items)))
    for item in items:
        length = item.fields["context_length"]
        depth = item.fields["depth_percent"]
        # The whole prompt, template and question included, is 90-100% of the length,
        # counted the way the model will be fed.
        assert item.prompt_tokens == tokenizer.count_prompt(item.prompt)
        assert 0.9 * length <= item.prompt_tokens <= length, (length, item.prompt_tokens)
        assert item.prompt.count(DEFAULT_NEEDLE) == 1
        assert item.prompt.rstrip().endswith("<|assistant|>") == (tok_name == "tiny_tokenizer")
        # Depth within a few percent of what was asked (one sentence is ~2-6% at 512).
        measured = needle_position(tokenizer, item.prompt, DEFAULT_NEEDLE)
        tolerance = 6.0 if length <= 512 else 3.0
        assert abs(measured - depth) <= tolerance, (length, depth, measured)
        # At a sentence boundary: a full sentence ends before it, one starts after it.
        document = DOC.search(item.prompt).group(1)
        before, _, after = document.partition(DEFAULT_NEEDLE)
        assert before == "" or before.rstrip()[-1] in ".!?"
        assert after == "" or (after[0].isspace() and after.lstrip()[0].isupper())
        if depth == 0:
            assert before == ""
        if depth == 100:
            assert after == ""


def test_items_are_stable(tiny_tokenizer):
    a = build(tiny_tokenizer, context_lengths=[600], depth_percents={"count": 3})
    b = build(tiny_tokenizer, context_lengths=[600], depth_percents={"count": 3})
    assert [i.prompt for i in a] == [i.prompt for i in b]


def test_range_forms_expand():
    params = NeedleParams.model_validate({"context_lengths": {"min": 1000, "max": 4000,
                                                              "count": 4},
                                          "depth_percents": {"count": 5}})
    assert params.lengths() == [1000, 2000, 3000, 4000]
    assert params.depths() == [0.0, 25.0, 50.0, 75.0, 100.0]


def test_refuses_lengths_beyond_model_maximum(tiny_tokenizer):
    ds = NeedleInAHaystack()
    params = ds.parse_params({"context_lengths": [4000], "max_new_tokens": 200})
    with pytest.raises(ParamError) as err:
        ds.check(params, ModelInfo("m", 4096))
    assert err.value.field == "context_lengths"
    assert "4096" in err.value.message and "beyond the maximum" in err.value.message
    ds.check(ds.parse_params({"context_lengths": [3800], "max_new_tokens": 200}),
             ModelInfo("m", 4096))
    with pytest.raises(ParamError):
        build(HFTokenizer(tiny_tokenizer.tokenizer, max_length=1024), context_lengths=[2048])


@pytest.mark.parametrize("params, field", [
    ({"context_lengths": []}, "context_lengths"),
    ({"context_lengths": [64]}, "context_lengths"),
    ({"depth_percents": [150]}, "depth_percents"),
    ({"context_lengths": {"min": 4000, "max": 1000}}, "context_lengths"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_params_name_the_field(params, field):
    with pytest.raises(ValidationError) as err:
        NeedleParams.model_validate(params)
    assert field in str(err.value)


def test_custom_needle_and_file_haystack(tiny_tokenizer, tmp_path):
    hay = tmp_path / "hay.txt"
    hay.write_text("Rivers carry silt to the sea. Old bridges cross them. " * 50)
    items = build(tiny_tokenizer, context_lengths=[400], depth_percents=[50],
                  haystack=str(hay), needle="The vault code is 4417.",
                  retrieval_question="What is the vault code?", answer="4417")
    assert items[0].prompt.count("The vault code is 4417.") == 1
    assert "Rivers carry silt" in items[0].prompt
    assert items[0].reference == "4417"
    with pytest.raises(ParamError) as err:
        build(tiny_tokenizer, context_lengths=[400], haystack=str(tmp_path / "missing.txt"))
    assert err.value.field == "haystack"
    with pytest.raises(ParamError) as err:
        build(tiny_tokenizer, context_lengths=[400], haystack=str(hay),
              needle="Old bridges cross them.")
    assert err.value.field == "needle"


def test_noise_haystack(tiny_tokenizer):
    items = build(tiny_tokenizer, context_lengths=[300], depth_percents=[50], haystack="noise")
    assert "The grass is green." in items[0].prompt
    assert 270 <= items[0].prompt_tokens <= 300


def test_split_sentences_keeps_text():
    text = "One two. Three four!\nFive six? Seven."
    units = split_sentences(text)
    assert units == [" One two.", " Three four!", "\nFive six?", " Seven."]
    assert "".join(units).strip() == text


# --- scoring ------------------------------------------------------------------------

def test_normalize():
    assert normalize("  The Answer: a Spoonful, of PAPRIKA!  ") == "answer spoonful of paprika"


@pytest.mark.parametrize("reply, expected", [
    ("a spoonful of smoked paprika", 1.0),
    ("The secret ingredient is A SPOONFUL of smoked paprika!", 1.0),
    ("It's a spoonful of smoked paprika, according to the document.", 1.0),
    ("", 0.0),
    ("I could not find it in the document.", 0.0),
    ("Nutmeg.", 0.0),
])
def test_score_exact_and_missing(reply, expected):
    assert score_answer(reply, DEFAULT_ANSWER) == expected


def test_score_paraphrase_gets_partial_credit():
    # answer words after normalisation: spoonful, of, smoked, paprika
    assert score_answer("Smoked paprika, one spoon.", DEFAULT_ANSWER) == pytest.approx(0.5)
    assert score_answer("paprika that was smoked, a spoonful", DEFAULT_ANSWER) == \
        pytest.approx(0.75)
    # word boundaries count: "paprikas" is not "paprika"
    assert score_answer("paprikas", DEFAULT_ANSWER) == 0.0


def test_aggregate_gives_overall_and_cells():
    ds = NeedleInAHaystack()
    scored = [({"context_length": 512, "depth_percent": 0.0}, 1.0),
              ({"context_length": 512, "depth_percent": 50.0}, 0.0),
              ({"context_length": 1024, "depth_percent": 0.0}, 0.5)]
    entries = ds.aggregate(scored)
    assert entries[0].name == "overall" and entries[0].value == pytest.approx(0.5)
    cells = {(e.labels["context_length"], e.labels["depth_percent"]): e.value
             for e in entries if e.name == "cell"}
    assert cells == {(512, 0.0): 1.0, (512, 50.0): 0.0, (1024, 0.0): 0.5}


# Unicode punctuation is a separator like ASCII punctuation (RULER's substring rule
# gives 1.0 on all of these: the answer is in the reply verbatim).
@pytest.mark.parametrize("reply, answer", [
    ("答案：北京。", "北京"),
    ("答案是北京", "北京"),
    ("根据文章，秘密配料是：一勺烟熏辣椒粉。", "一勺烟熏辣椒粉"),
    ("The answer is “a spoonful of smoked paprika”.", DEFAULT_ANSWER),
    ("The answer is ‘a spoonful of smoked paprika’", DEFAULT_ANSWER),
    ("答案是「一勺烟熏辣椒粉」", "一勺烟熏辣椒粉"),
    ("Réponse : «a spoonful of smoked paprika»", DEFAULT_ANSWER),
    ("a spoonful of smoked paprika。", DEFAULT_ANSWER),
    ("a spoonful of smoked paprika，I think", DEFAULT_ANSWER),
    ("a spoonful of smoked paprika…", DEFAULT_ANSWER),
    ("It is — a spoonful of smoked paprika — of course", DEFAULT_ANSWER),
])
def test_unicode_punctuation_separates(reply, answer):
    assert score_answer(reply, answer) == 1.0


def test_unicode_punctuation_keeps_word_boundaries():
    assert normalize("«Paprika»。") == "paprika"
    assert score_answer("«paprikas»", "paprika") == 0.0
    assert score_answer("答案：上海。", "北京") == 0.0


def test_by_default_each_lengths_depths_are_answered_together():
    """The fast setting without asking: a batch per context length, its depths continuing
    their shared haystack together (a bare loop's 0.61x against 0.95x at batch 1)."""
    from backend.datasets.needle_in_haystack import NeedleParams

    assert NeedleParams().batch_size == 5
    assert NeedleParams(depth_percents=[10, 90]).batch_size == 2
    assert NeedleParams(depth_percents={"count": 11}, batch_size=1).batch_size == 1
    assert NeedleParams(batch_size="auto").batch_size == "auto"
