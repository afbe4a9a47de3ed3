"""Shared prefixes found by the transformers runner itself: a batch's longest common token
prefix (a few-shot header and examples) is computed once and each row continues from it,
for generation and log-likelihood, from our datasets and from lm-eval tasks; the greedy
replies and the log-likelihoods equal the unshared ones (float32 on the CPU)."""

from __future__ import annotations

import pytest

from backend.datasets.registry import get_dataset
from backend.engine.answering import order_for_batching
from backend.engine.contracts import GenerationRequest
from backend.runners.base import PromptView
from backend.runners.hf.runner import HFRunner
from tests.conftest import ROOT
from tests.test_prefix_sharing import _alone, _ids, _tiny


@pytest.fixture
def shared_tokens(monkeypatch):
    """The tokens each shared-prefix batch took from the kept prefix, per row."""
    seen: list[list[int]] = []

    def spying(real):
        def spy(self, requests, prompts, shared):
            seen.append(list(shared))
            return real(self, requests, prompts, shared)
        return spy

    for name in ("_continue_batch", "_continue_together"):
        monkeypatch.setattr(HFRunner, name, spying(getattr(HFRunner, name)))
    return seen


def _gsm8k_requests(runner: HFRunner) -> list[GenerationRequest]:
    """GSM8K with two solved examples before each question (no `Item.prefix`)."""
    ds = get_dataset("gsm8k")
    params = ds.parse_params({"data_dir": str(ROOT / "tests" / "fixtures" / "gsm8k"),
                              "shots": 2, "max_new_tokens": 24, "use_chat_template": False})
    items = ds.build_items(params, PromptView(runner, False))
    assert len(items) == 3 and not any(i.prefix for i in items)
    return [GenerationRequest(i.prompt, i.max_new_tokens, False) for i in items]


def test_a_few_shot_batch_computes_its_shared_prefix_once(settings, with_tiny, shared_tokens):
    runner = _tiny(settings)
    requests = _gsm8k_requests(runner)
    alone = _alone(runner, requests)
    assert any(g.output_tokens > 1 for g in alone)
    together = runner.generate(requests)
    assert _ids(together) == _ids(alone)
    assert [g.prompt_tokens for g in together] == [g.prompt_tokens for g in alone]
    shots = len(runner.tok.prompt_ids(requests[0].prompt.split("Question:")[0] + "Question:",
                                      False))
    (shared,) = shared_tokens
    assert min(shared) >= shots - 1
    timing = together[0].extra["timing"]
    assert timing["shared_prefix_tokens"] == 2 * min(shared)  # reused by the 2nd and 3rd


def test_a_few_shot_batch_computes_every_rest_in_one_pass(settings, with_tiny):
    """The rows' own parts (questions of different lengths) are computed together, in
    one forward pass after the prefix's, laid out prefix, padding, question; the
    replies are each prompt's alone, and the batch holds no more than the same batch
    unshared (the plain plan admission counts, by the census)."""
    from backend.engine.contracts import BatchPlan
    from tests.memory_census import StorageCensus

    runner = _tiny(settings)
    requests = _gsm8k_requests(runner)
    prompts = [runner.tok.prompt_ids(r.prompt, False) for r in requests]
    assert len({len(p) for p in prompts}) == 3  # three lengths: the layout has holes
    alone = _alone(runner, requests)
    widths: list[int] = []
    runner.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True)
    runner.forget_prefixes()
    plain = BatchPlan("generate", 3, max(map(len, prompts)), requests[0].max_new_tokens,
                      padded=True)
    with StorageCensus(runner.model) as census:
        together = runner.generate(requests)
    assert _ids(together) == _ids(alone)
    prefill = [tuple(w) for w in widths if w[1] > 1]
    assert len(prefill) == 2 and prefill[0][0] == 1 and prefill[1][0] == 3
    assert census.peak_bytes <= runner.work_bytes(plain), census.where


def test_prompts_that_share_little_are_not_split(settings, with_tiny, shared_tokens):
    """A common prefix under MIN_SHARED_PREFIX tokens is left to the ordinary batch."""
    runner = _tiny(settings)
    requests = [GenerationRequest(f"Question {i}: what comes after {i}?", 6, False)
                for i in range(3)]
    assert _ids(runner.generate(requests)) == _ids(_alone(runner, requests))
    assert shared_tokens == []


def test_generation_items_sharing_a_prefix_are_batched_together():
    """Generation items go in runs of a shared prefix, longest first within a run, as
    multiple-choice ones do, so a batch's rows share the most they can."""
    from backend.datasets.base import Item

    head_a, head_b = "A" * 80 + "\n", "B" * 80 + "\n"
    prompts = [head_a + "q1", head_b + "a long question two", head_a + "a longer q3",
               head_b + "q4", "lonely"]
    items = [Item(i, p, len(p), 8, None) for i, p in enumerate(prompts)]
    order = [i.idx for i in order_for_batching(items)]
    assert order in ([1, 3, 2, 0, 4], [2, 0, 1, 3, 4])


DESCRIPTION = ("The following are short questions about arithmetic and general knowledge, "
               "each followed by its answer. Read every question carefully and answer it "
               "as briefly as you can.")


def _few_shot_tasks(tasks_dir):
    """lbs_gen and lbs_mc with a fixed description and three examples before every
    document (the `first_n` sampler, as lm-eval's gsm8k does)."""
    for name in ("lbs_gen", "lbs_mc"):
        path = tasks_dir / f"{name}.yaml"
        text = path.read_text().replace(f"task: {name}", f"task: {name}_shots")
        if "fewshot_split" not in text:
            text += "fewshot_split: test\n"
        text += f'fewshot_config:\n  sampler: first_n\ndescription: "{DESCRIPTION}\\n\\n"\n'
        (tasks_dir / f"{name}_shots.yaml").write_text(text)
    return ["lbs_gen_shots", "lbs_mc_shots"]


def _lm_eval_job(tasks, batch_size):
    from tests.test_lm_eval import _ours

    outcome, sink = _ours(tasks, {"num_fewshot": 3, "batch_size": batch_size})
    return {(r.fields["task"], r.fields["doc_id"]): r for r in sink.records}


def test_lm_eval_few_shot_tasks_share_their_prefix(with_tiny, tasks_dir, monkeypatch,
                                                   shared_tokens):
    """Through the lm_eval dataset, a batch of lm-eval's requests shares its few-shot
    prefix in the runner (generation and multiple choice), with the replies and
    log-likelihoods of one request at a time."""
    from backend.runners.hf import scoring

    prefixes: list[int] = []
    real = scoring.Scorer._score

    def score(self, batch, share_prefix=True):
        contexts = [list(ctx) for ctx, _ in batch]
        if share_prefix and len(batch) > 1:
            prefixes.append(scoring.common_length(contexts))
        return real(self, batch, share_prefix)

    monkeypatch.setattr(scoring.Scorer, "_score", score)
    tasks = _few_shot_tasks(tasks_dir)
    one = _lm_eval_job(tasks, 1)
    assert shared_tokens == [] and prefixes == []
    batched = _lm_eval_job(tasks, 8)
    assert shared_tokens and min(min(s) for s in shared_tokens) >= scoring.MIN_SHARED_PREFIX
    assert prefixes and min(prefixes) >= scoring.MIN_SHARED_PREFIX
    assert set(one) == set(batched) and len(one) == 11
    for key, row in one.items():
        other = batched[key]
        if key[0] == "lbs_gen_shots":
            assert other.fields["raw"] == row.fields["raw"], key
        else:
            for got, want in zip(other.fields["resps"], row.fields["resps"], strict=True):
                assert got[0] == pytest.approx(want[0], abs=1e-5), key
                assert got[1] == want[1], key
