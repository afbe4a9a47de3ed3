"""Log-likelihood scoring: batched across questions (batch_size honoured, "auto" probed,
halved on out-of-memory), equal to unbatched scoring, in the original order; the one
context/continuation split rule, checked against lm-evaluation-harness's own function;
log-probabilities stored at full precision."""

from __future__ import annotations

import random

import pytest
import torch

from backend.engine.contracts import LoglikelihoodRequest
from tests.conftest import ROOT


def _plain(context: str, continuation: str) -> LoglikelihoodRequest:
    """A request whose context is plain text (no chat template), as C-Eval's default."""
    return LoglikelihoodRequest(context, continuation, chat_template=False)

FIXTURES = ROOT / "tests" / "fixtures" / "ceval"


@pytest.fixture(scope="module")
def tiny_runner(builtin_models_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backend.engine.contracts import ModelSpec
    from backend.runners.hf.runner import HFRunner

    folder = builtin_models_dir / "builtin-tiny-v1"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return HFRunner(ModelSpec("tiny", folder), model, AutoTokenizer.from_pretrained(folder),
                    "cpu", 8192)


@pytest.fixture
def forward_rows(tiny_runner):
    """Rows (batch size) of every forward pass of the tiny model, in order."""
    rows: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows.append(ids.shape[0])
    handle = tiny_runner.model.register_forward_pre_hook(hook, with_kwargs=True)
    yield rows
    handle.remove()


def _requests() -> list[LoglikelihoodRequest]:
    """Contexts of different lengths, shared contexts, answer letters and longer
    continuations, trailing whitespace of every kind; shuffled."""
    words = "the river runs past the old mill and the miller sleeps until noon".split()
    out = []
    for i in range(7):
        ctx = "问题：" + " ".join(words[: 2 + 2 * i]) + ["\n答案：", "\n", " ", "\t", ":", "\n\n",
                                                      " \n"][i]
        out += [_plain(ctx, c) for c in ("A", "B", "C", "D")]
        out.append(_plain(ctx, " and then some more words"))
        if i == 0:  # two longer continuations of one context
            out.append(_plain(ctx, "the old mill"))
    random.Random(7).shuffle(out)
    return out


def _bare(runner, request) -> float:
    """One full forward pass over context + continuation, no padding, no cache."""
    ctx, cont = runner._split(request)
    with torch.no_grad():
        logp = torch.log_softmax(runner.model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_batched_results_equal_unbatched_in_the_original_order(tiny_runner, forward_rows):
    requests = _requests()
    one = tiny_runner.loglikelihood(requests, batch_size=1)
    singles = len(forward_rows)
    forward_rows.clear()
    batched = tiny_runner.loglikelihood(requests, batch_size=4)
    # 7 contexts, each with a longer continuation: alone, two passes per context; batched,
    # ceil(7/4) = 2 padded passes over contexts, each followed by one pass over the longer
    # continuations of its contexts (letters after whitespace are 2 tokens: "\n" + "A")
    longer = sum(len(tiny_runner._split(r)[1]) > 1 for r in requests)
    assert singles == 7 * 2 and len(forward_rows) == 4
    assert forward_rows[0::2] == [4, 3] and sum(forward_rows[1::2]) == longer
    for request, a, b in zip(requests, one, batched, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
        assert b.logprob == pytest.approx(_bare(tiny_runner, request), abs=1e-4)
        assert (b.tokens, b.is_greedy) == (a.tokens, a.is_greedy)
    assert [r.tokens for r in batched] == [len(tiny_runner._split(r)[1]) for r in requests]


def test_a_shared_prompt_prefix_is_computed_once_per_batch(tiny_runner):
    """Few-shot prompts: the header and examples common to a batch's questions go through
    the model once; the padded pass covers only each question's own tokens."""
    header = "以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n\n" + "".join(
        f"例题{k}：the river runs past the old mill number {k}\n答案：A\n\n" for k in range(4))
    questions = ["光速是多少？", "电阻的单位是什么？ the miller sleeps", "水的沸点？",
                 "牛顿第一定律说的是 what the river runs past"]
    requests = [_plain(header + q + "\n答案：", c)
                for q in questions for c in ("A", "B", " and the old mill")]
    passes: list[tuple[int, int]] = []
    handle = tiny_runner.model.register_forward_pre_hook(
        lambda m, a, kw: passes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        batched = tiny_runner.loglikelihood(requests, batch_size=4)
    finally:
        handle.remove()
    shared = len(tiny_runner.tok.prompt_ids(header)) - 2  # tokens may merge at the seam
    longest = max(len(tiny_runner._split(r)[0]) for r in requests)
    assert passes[0][0] == 1 and passes[0][1] >= shared  # the prefix, once
    assert passes[1][0] == 4 and passes[1][1] <= longest - shared  # then only the questions
    one = tiny_runner.loglikelihood(requests, batch_size=1)
    for request, a, b in zip(requests, one, batched, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
        assert b.logprob == pytest.approx(_bare(tiny_runner, request), abs=1e-4)
        assert (b.tokens, b.is_greedy) == (a.tokens, a.is_greedy)


def test_answer_letters_without_a_shared_prefix_take_the_causal_path(tiny_runner):
    """Questions that share no long prefix, scored by single-token answers: one
    right-padded pass without an attention mask (the causal kernel, as lm-eval's HF
    backend runs it), logits only at each row's last token, the unbatched scores."""
    words = "the river runs past the old mill and the miller sleeps until noon".split()
    requests = [_plain(f"Q{i}: " + " ".join(words[:3 + 3 * i]) + "\nA:", f" {c}")
                for i in range(4) for c in "ABCD"]
    passes: list[tuple[tuple[int, ...], bool]] = []
    handle = tiny_runner.model.register_forward_pre_hook(
        lambda m, a, kw: passes.append((tuple(kw["input_ids"].shape),
                                        kw.get("attention_mask") is None)), with_kwargs=True)
    try:
        batched = tiny_runner.loglikelihood(requests, batch_size=4)
    finally:
        handle.remove()
    assert len(passes) == 1 and passes[0][0][0] == 4 and passes[0][1]
    for request, b in zip(requests, batched, strict=True):
        assert b.logprob == pytest.approx(_bare(tiny_runner, request), abs=1e-4)
    one = tiny_runner.loglikelihood(requests, batch_size=1)
    for a, b in zip(one, batched, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
        assert (b.tokens, b.is_greedy) == (a.tokens, a.is_greedy)


def _ceval_job(settings, batch_size):
    from backend.apps.cli import _ListSink
    from backend.engine.evaluation import run_evaluation
    from backend.engine.memory.manager import ModelManager
    from backend.engine.preparation import prepare

    job = prepare("builtin:tiny", "ceval", {"data_dir": str(FIXTURES), "shots": 1,
                                            "batch_size": batch_size}, settings, confine=False)
    sink = _ListSink()
    sink.set_total = lambda total: None
    outcome = run_evaluation(job, ModelManager(use_cache=False), settings, sink)
    return outcome, sorted(sink.records, key=lambda r: r.idx)


@pytest.fixture
def job_forwards(monkeypatch):
    """Rows of every padded forward pass over questions of models loaded by
    HFRunner.load during the test; `limit` > 0 makes batches of more rows raise CUDA's
    out-of-memory error (so "auto" checks its batch by a real step, as on CUDA)."""
    from backend.runners.hf.runner import HFRunner

    rows: list[int] = []
    state = {"limit": 0}
    real = HFRunner.load.__func__

    def load(cls, *args, **kwargs):
        runner = real(cls, *args, **kwargs)

        def hook(module, args, kwargs):
            if kwargs.get("attention_mask") is None and kwargs.get("use_cache"):
                return  # a batch's shared prompt prefix, computed once (one row)
            n = kwargs["input_ids"].shape[0]
            rows.append(n)
            if state["limit"] and n > state["limit"]:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")
        runner.model.register_forward_pre_hook(hook, with_kwargs=True)
        runner.steps_can_fail = lambda: True
        return runner
    monkeypatch.setattr(HFRunner, "load", classmethod(load))
    return rows, state


def test_a_ceval_job_honours_batch_size(settings, with_tiny, job_forwards):
    rows, _ = job_forwards
    _, alone = _ceval_job(settings, 1)
    assert rows == [1] * 5  # one pass per question
    rows.clear()
    _, batched = _ceval_job(settings, 4)
    assert rows == [4, 1]  # 5 questions, 4 at a time
    assert [r.prediction for r in batched] == [r.prediction for r in alone]
    for a, b in zip(alone, batched, strict=True):
        for letter in "ABCD":
            assert b.fields["logprobs"][letter] == pytest.approx(a.fields["logprobs"][letter],
                                                                 abs=1e-5)


def test_auto_batch_size_probes_the_longest_question_and_halves_on_oom(
        settings, with_tiny, job_forwards, caplog):
    rows, state = job_forwards
    state["limit"] = 2  # batches of more than 2 questions do not fit
    caplog.set_level("INFO")
    outcome, records = _ceval_job(settings, "auto")
    # the probe tries all 5 questions, then halves: 2 fits; then the job's first
    # question settles, one is timed alone and two together, and the last goes alone
    # (the fastest size), each question answered once
    assert rows[:2] == [5, 2] and rows[2:5] == [1, 1, 2] and sum(rows[5:]) == 1
    assert len(records) == 5 and all(r.error is None for r in records)
    assert "batch_size auto: 2 fit" in caplog.text


def test_oom_during_a_multiple_choice_batch_halves_it(settings, with_tiny, job_forwards):
    rows, state = job_forwards
    _, alone = _ceval_job(settings, 1)
    rows.clear()
    state["limit"] = 2
    outcome, records = _ceval_job(settings, 4)
    assert rows == [4, 2, 2, 1]  # 4 fails, then pairs; the halved size sticks
    assert [r.prediction for r in records] == [r.prediction for r in alone]
    ooms = [e for e in outcome.events if e["kind"] == "oom"]
    assert len(ooms) == 1 and ooms[0]["note"].startswith("batch size 4")


def test_stored_logprobs_keep_full_precision(tiny_runner):
    from backend.datasets.ceval import CEval
    from backend.engine.answering import choose

    ds = CEval()
    item = ds.build_items(ds.parse_params({"data_dir": str(FIXTURES)}), tiny_runner)[0]
    _, _, _, fields = choose(tiny_runner, item, False)
    raw = tiny_runner.loglikelihood([_plain(item.prompt, c) for c in "ABCD"])
    assert fields["logprobs"] == {c: r.logprob for c, r in zip("ABCD", raw, strict=True)}
    assert any(round(v, 4) != v for v in fields["logprobs"].values())


# --- the context/continuation split rule, against lm-evaluation-harness -------------

class _LmEvalShim:
    """What lm-eval's TemplateLM._encode_pair reads of its model: a causal backend and
    tok_encode (HFLM's default adds the tokenizer's special tokens, as prompt_ids does)."""

    backend = "causal"

    def __init__(self, runner):
        self.tok_encode = lambda text: runner.tok.prompt_ids(text, False)


@pytest.mark.parametrize("context, continuation", [
    ("以下是单项选择题。\n答案：", "A"),
    ("Question: which?\nAnswer:", " B"),
    ("Question: which?\nAnswer: ", "C"),
    ("Question: which?\nAnswer:  ", "C"),
    ("Question: which?\nAnswer:\n", "A"),
    ("Question: which?\nAnswer:\n\n", "D"),
    ("Question: which?\nAnswer:\t", "B"),
    ("Question: which?\nAnswer: \n\t ", "the river"),
    ("答案：\n", "A"),
    ("The river runs\n", " past the old mill"),
])
def test_split_matches_lm_eval_encode_pair(tiny_runner, context, continuation):
    from lm_eval.api.model import TemplateLM

    expected = TemplateLM._encode_pair(_LmEvalShim(tiny_runner), context, continuation)
    assert tiny_runner._split(_plain(context, continuation)) == expected


def test_order_for_batching_keeps_shared_prompts_together_longest_first():
    from backend.datasets.base import Item
    from backend.engine.answering import order_for_batching

    shots = {s: f"Subject {s}: " + "worked example. " * 8 for s in "xy"}

    def item(idx, prompt, choices=("A", "B")):
        return Item(idx, prompt, len(prompt), 4, "A", choices=list(choices) if choices else None)
    items = [item(0, shots["x"] + "short?"), item(1, shots["y"] + "a longer question here?"),
             item(2, "generate this", None), item(3, shots["x"] + "a much longer question, yes?"),
             item(4, shots["y"] + "mid one?"), item(5, "zero-shot question, alone")]
    # runs: subject x (it holds the longest prompt), then subject y, then the lone prompt;
    # generation items after, as given
    assert [i.idx for i in order_for_batching(items)] == [3, 0, 1, 4, 5, 2]
