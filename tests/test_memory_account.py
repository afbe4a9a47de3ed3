"""The memory account (runners/hf/account.py) against the census of live tensor storage
(tests/memory_census.py) on every code path of the transformers runner, on the CPU:
for each batch the runner runs, the peak of what it holds beyond the weights is at most
the account of that batch's plan, and the account is at most 1.3 times that peak.

The plan of a batch is read off the requests as the runner sees them (`plan_of`), the
way a dataset states its worst batch for admission, with the real token counts."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import replace
from functools import wraps

import pytest

from backend.engine.contracts import BatchPlan, GenerationRequest, LoglikelihoodRequest
from backend.runners.hf.loading import LoadOptions
from backend.runners.hf.runner import HFRunner
from backend.runners.hf.scoring import MIN_SHARED_PREFIX, common_length
from backend.runners.models import resolve_model
from tests.memory_census import StorageCensus
from tests.test_prefix_sharing import _alone

SLACK = 1.3


def _load(settings, method: str = "default") -> HFRunner:
    spec = resolve_model("builtin:tiny", settings)
    return HFRunner.load(spec, LoadOptions.from_settings(settings, method), settings)


def _text(runner: HFRunner, tokens: int, seed: int) -> str:
    """Text of about `tokens` tokens, different for each seed (so no prefix is shared)."""
    rng = random.Random(seed)
    return runner.tokenizer.decode([rng.randrange(100, 2000) for _ in range(tokens)])


def plan_of(runner: HFRunner, kind: str, requests: list, batch_size: int = 1) -> BatchPlan:
    """The plan of the batch `requests` make in `runner` (its longest, first batch)."""
    if kind == "generate":
        prompts = [runner.tok.prompt_ids(r.prompt, r.chat_template) for r in requests]
        shared = 0
        if runner.share_prefixes and not runner.static_cache and any(r.prefix for r in requests):
            shared = max(1, min(runner._shared_length(r, ids)
                                for r, ids in zip(requests, prompts, strict=True)))
        return BatchPlan("generate", len(requests), max(map(len, prompts)),
                         max(r.max_new_tokens for r in requests), shared_prefix=shared,
                         padded=len({len(p) for p in prompts}) > 1)
    if kind == "loglikelihood":
        groups: dict[tuple[int, ...], list[list[int]]] = {}
        for request in requests:
            ctx, cont = runner._split(request)
            groups.setdefault(tuple(ctx), []).append(cont)
        order = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(map(len, g[1]))))
        step = max(1, batch_size)
        return max((_score_plan(order[i:i + step]) for i in range(0, len(order), step)),
                   key=runner.work_bytes)
    width = max(min(len(runner.tokenizer.encode(t)) + 1, runner.max_length) for t in requests)
    return BatchPlan("rolling", 1, width, 0, padded=False, logits_positions=width)


def _score_plan(batch: list[tuple[tuple[int, ...], list[list[int]]]]) -> BatchPlan:
    """The plan of one `HFRunner._score` batch: its contexts and their continuations."""
    contexts = [list(ctx) for ctx, _ in batch]
    shared = common_length(contexts) if len(batch) > 1 else 0
    shared = min(shared, min(map(len, contexts)) - 1)
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    return BatchPlan("loglikelihood", len(batch), max(map(len, contexts)),
                     max(len(c) for _, conts in batch for c in conts), shared_prefix=shared,
                     padded=len({len(c) - shared for c in contexts}) > 1,
                     continuations=sum(len(c) > 1 for _, conts in batch for c in conts))


class Oracle:
    """Runs every batch a runner is asked for under a census, noting (plan, peak)."""

    def __init__(self, runner: HFRunner, monkeypatch):
        self.runner, self.batches = runner, []
        for kind, name in (("generate", "generate"), ("loglikelihood", "loglikelihood"),
                           ("rolling", "loglikelihood_rolling")):
            monkeypatch.setattr(runner, name, self._counted(kind, getattr(runner, name)))

    def _counted(self, kind: str, method):
        @wraps(method)
        def run(requests, *args, **kwargs):
            size = kwargs.get("batch_size", args[0] if args else 1)
            plan = plan_of(self.runner, kind, requests, size)
            account = self.runner.work_bytes(plan)  # while the model is loaded
            with StorageCensus(self.runner.model) as census:
                out = method(requests, *args, **kwargs)
            self.batches.append((plan, account, census.peak_bytes, census.where))
            return out
        return run

    def check(self) -> None:
        assert self.batches
        for plan, account, peak, where in self.batches:
            assert peak <= account <= SLACK * peak, (plan, peak, account, where)


def _measure(runner: HFRunner, kind: str, requests: list, batch_size: int = 1):
    plan = plan_of(runner, kind, requests, batch_size)
    method = {"generate": runner.generate, "loglikelihood": runner.loglikelihood,
              "rolling": runner.loglikelihood_rolling}[kind]
    args = (batch_size,) if kind == "loglikelihood" else ()
    with StorageCensus(runner.model) as census:
        method(requests, *args)
    return plan, census.peak_bytes, runner.work_bytes(plan), census.where


def _within(runner, kind, requests, batch_size=1) -> BatchPlan:
    plan, peak, account, where = _measure(runner, kind, requests, batch_size)
    assert peak <= account <= SLACK * peak, (plan, peak, account, where)
    return plan


@pytest.fixture
def tiny(settings, with_tiny) -> HFRunner:
    return _load(settings)


def test_plain_generate(tiny):
    plan = _within(tiny, "generate", [GenerationRequest(_text(tiny, 1500, 1), 16, False)])
    assert (plan.rows, plan.padded) == (1, False)


def test_padded_batch_counts_its_mask(tiny):
    requests = [GenerationRequest(_text(tiny, n, n), 12, False) for n in (1200, 1000, 800, 700)]
    plan = _within(tiny, "generate", requests)
    assert plan.rows == 4 and plan.padded
    # without the [4, 1, T, T] mask the account falls short of what the batch holds
    _, peak, _, _ = _measure(tiny, "generate", requests)
    assert tiny.work_bytes(replace(plan, padded=False)) < peak


def test_shared_prefix_alone(tiny):
    head = _text(tiny, 1500, 1)
    prefix = head + _text(tiny, 40, 2)
    request = GenerationRequest(prefix + _text(tiny, 300, 3), 8, False, prefix=prefix)
    tiny.forget_prefixes()
    plan = _within(tiny, "generate", [request])
    assert plan.shared_prefix > 1000


def test_a_row_continuing_a_short_prefix_holds_its_whole_mask(tiny):
    """A shallow needle: the row's own 4,000-odd tokens are queries after the prefix's
    keys, which SDPA's `is_causal` cannot express, so transformers builds the boolean
    [1, 1, q, T] mask although nothing is padded."""
    prefix = _text(tiny, 40, 1)
    request = GenerationRequest(prefix + _text(tiny, 4000, 2), 8, False, prefix=prefix)
    tiny.forget_prefixes()
    plan = _within(tiny, "generate", [request])
    assert 0 < plan.shared_prefix < 100 and not plan.padded
    tiny.forget_prefixes()
    with StorageCensus(tiny.model, detail=True) as census:
        tiny.generate([request])
    rest, keys = plan.prompt_tokens - plan.shared_prefix, plan.prompt_tokens
    # the largest tensor held: the row's queries x all keys (its last token may be
    # left to the decode step, a row and a column less)
    assert (rest - 1) * (keys - 1) <= census.at_peak[0][0] <= rest * keys


def test_shared_prefix_batch(tiny):
    head = _text(tiny, 1500, 1)
    prefixes = [head + _text(tiny, 40 * (i + 1), 10 + i) for i in range(3)]
    requests = [GenerationRequest(p + _text(tiny, 300, 20), 8, False, prefix=p)
                for p in prefixes]
    tiny.forget_prefixes()
    plan = _within(tiny, "generate", requests)
    assert plan.rows == 3 and plan.shared_prefix > 1000


def test_loglikelihood_letters_from_one_position(tiny):
    requests = [LoglikelihoodRequest(_text(tiny, 300 + 40 * i, i), " A", False)
                for i in range(4)]
    plan = _within(tiny, "loglikelihood", requests, batch_size=4)
    assert plan.new_tokens == 1 and plan.shared_prefix == 0


def test_batched_loglikelihood_with_a_shared_prefix(tiny):
    head = _text(tiny, 600, 1)
    requests = [LoglikelihoodRequest(head + _text(tiny, 40 + 30 * i, 10 + i),
                                     _text(tiny, 12, 20 + j), False)
                for i in range(4) for j in range(3)]
    plan = _within(tiny, "loglikelihood", requests, batch_size=4)
    assert plan.shared_prefix >= 600 and plan.continuations >= 4


def test_rolling_loglikelihood(tiny):
    plan = _within(tiny, "rolling", [_text(tiny, 3000, 1)])
    assert plan.logits_positions == plan.prompt_tokens > 2000


def test_rolling_loglikelihood_of_several_texts_holds_one_window_at_a_time(tiny):
    """The texts are scored one after another: the last text's logits must be gone
    when the next one's forward pass runs, or two windows' logits are held at once."""
    plan = _within(tiny, "rolling", [_text(tiny, 2000, 1), _text(tiny, 2000, 2)])
    assert plan.rows == 1


@pytest.mark.parametrize("method", ["basic", "optimized"])
def test_methods(settings, with_tiny, method):
    runner = _load(settings, method)
    requests = [GenerationRequest(_text(runner, n, n), 16, False) for n in (700, 600)]
    plan = _within(runner, "generate", requests)
    assert runner.work_bytes(plan) == runner.work_bytes(replace(plan, method=method))


def test_a_methods_comparison_job(settings, with_tiny, monkeypatch):
    """A NIAH job comparing basic and optimized, through the evaluation loop: every batch
    of either loaded model within its account."""
    from backend.apps.cli import _ListSink
    from backend.engine.evaluation import run_evaluation
    from backend.engine.memory.manager import ModelManager
    from backend.engine.preparation import prepare

    oracles = []
    load = HFRunner.load.__func__

    def counted(cls, *args, **kwargs):
        runner = load(cls, *args, **kwargs)
        oracles.append(Oracle(runner, monkeypatch))
        return runner

    monkeypatch.setattr(HFRunner, "load", classmethod(counted))
    job = prepare("builtin:tiny", "needle_in_haystack",
                  {"context_lengths": [1200], "depth_percents": [50],
                   "max_new_tokens": 8, "methods": ["basic", "optimized"]}, settings)
    run_evaluation(job, ModelManager(use_cache=False), settings, _ListSink())
    assert len(oracles) == 2
    for oracle in oracles:
        oracle.check()


def test_an_lm_eval_task_mix(settings, with_tiny, monkeypatch, tmp_path):
    """Multiple choice, generation and perplexity tasks in one lm-eval job through the
    evaluation loop: every batch the runner is asked for within its account."""
    import shutil

    from backend.apps.cli import _ListSink
    from backend.engine.evaluation import run_evaluation
    from backend.engine.memory.manager import ModelManager
    from backend.engine.preparation import prepare
    from tests.test_lm_eval import FIXTURES

    folder = tmp_path / "tasks"
    shutil.copytree(FIXTURES, folder)
    for yaml in folder.glob("*.yaml"):
        text = yaml.read_text()
        for data in ("mc.jsonl", "gen.jsonl", "text.jsonl"):
            text = text.replace(f": {data}", f": {folder / data}")
        yaml.write_text(text)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    oracles = []
    load = HFRunner.load.__func__

    def counted(cls, *args, **kwargs):
        runner = load(cls, *args, **kwargs)
        oracles.append(Oracle(runner, monkeypatch))
        return runner

    monkeypatch.setattr(HFRunner, "load", classmethod(counted))
    from backend.datasets.lm_eval_tasks import LmEvalTasks

    monkeypatch.setattr(LmEvalTasks, "include_path", (str(folder),))
    # as LBS_LM_EVAL_INCLUDE_PATH would: prepare configures the dataset from the settings
    settings = dataclasses.replace(settings, lm_eval_include_path=(str(folder),))
    job = prepare("builtin:tiny", "lm_eval",
                  {"tasks": ["lbs_mc", "lbs_gen", "lbs_ppl"], "batch_size": 4}, settings,
                  confine=False)
    monkeypatch.setattr(LmEvalTasks, "include_path", (str(folder),))
    run_evaluation(job, ModelManager(use_cache=False), settings, _ListSink())
    (oracle,) = oracles
    kinds = {plan.kind for plan, _, _, _ in oracle.batches}
    assert kinds == {"generate", "loglikelihood", "rolling"}
    oracle.check()


def _deep_narrow_model(settings, folder):
    """A Llama with an 8k context whose key/value cache outweighs one layer's work, as in
    real models (4 layers of one 128-wide head over a 64-wide residual): what a NIAH
    batch holds is then mostly its caches. The built-in model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _load(settings).tokenizer
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=1, num_key_value_heads=1,
                         head_dim=128, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_niah_8k_batch_of_5_job_holds_no_more_than_admission_counted(settings, with_tiny,
                                                                        monkeypatch, tmp_path):
    """The memory account's headline case: NIAH at 8k tokens, five depths in one batch, on
    a model with an 8k context, through the evaluation loop: what the runner holds
    beyond its weights stays within what admission counted for the job."""
    from backend.apps.cli import _ListSink
    from backend.engine.evaluation import run_evaluation
    from backend.engine.memory.manager import ModelManager
    from backend.engine.preparation import prepare
    from backend.runners.models import estimate_model_bytes

    model = _deep_narrow_model(settings, tmp_path / "zoo" / "deep-narrow")
    oracles = []
    load = HFRunner.load.__func__

    def counted(cls, *args, **kwargs):
        runner = load(cls, *args, **kwargs)
        oracles.append(Oracle(runner, monkeypatch))
        return runner

    monkeypatch.setattr(HFRunner, "load", classmethod(counted))
    job = prepare(str(model), "needle_in_haystack",
                  {"context_lengths": [8000], "depth_percents": [0, 25, 50, 75, 100],
                   "max_new_tokens": 8, "batch_size": 5}, settings)
    admitted = job.runner.estimate_job_bytes(job, settings) \
        - estimate_model_bytes(job.spec, settings.torch_dtype)
    run_evaluation(job, ModelManager(use_cache=False), settings, _ListSink())
    ((plan, _, peak, where),) = oracles[0].batches
    assert plan.rows == 5 and plan.prompt_tokens > 7000
    print(f"NIAH 8k x 5: held {peak / 2**20:.1f} MiB beyond the weights at {where}; "
          f"admission counted {admitted / 2**20:.1f} MiB")
    assert peak <= admitted, (peak, admitted, where)


def test_requests_sent_alone_continue_the_kept_prefix_without_a_copy(tiny):
    """Few-shot prompts sent one at a time (batch_size 1): from the second on, the prompt
    continues the prefix it shares with the one before on the kept prefix's own cache,
    so a call holds what the same prompt holds unshared (the plain plan's account),
    never a copy of the prefix beside the kept one; the replies are the unshared ones."""
    head = _text(tiny, 1500, 1)
    requests = [GenerationRequest(head + _text(tiny, 200, 10 + i), 12, False)
                for i in range(3)]
    want = [(g.text, g.output_tokens) for g in _alone(tiny, requests)]
    tiny.forget_prefixes()
    got = []
    for request in requests:
        plan = plan_of(tiny, "generate", [request])
        assert plan.shared_prefix == 0  # the plain plan, the one admission counts
        with StorageCensus(tiny.model) as census:
            got += tiny.generate([request])
        assert census.peak_bytes <= tiny.work_bytes(plan), (plan, census.where)
    assert [(g.text, g.output_tokens) for g in got] == want
    timing = [g.extra["timing"] for g in got]
    # the first has nothing to share with; the second computes the common part into
    # the kept prefix; the third computes only its own part
    assert "shared_prefix_tokens" not in timing[0] and timing[1]["shared_prefix_tokens"] == 0
    assert timing[2]["shared_prefix_tokens"] >= 1400 and timing[2]["prefill_tokens"] < 260
