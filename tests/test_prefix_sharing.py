"""Prefix-shared NIAH prefill: prompts that differ only from the needle onward continue
from a copy of their shared prefix's key/value cache, and the greedy answers are the
same, token for token, as each prompt's alone (float32 on the CPU)."""

from __future__ import annotations

import pytest
import torch

from backend.datasets.registry import get_dataset
from backend.engine.answering import Backoff
from backend.engine.contracts import GenerationRequest
from backend.queue import jobs
from backend.queue.db import JobState
from backend.runners.base import PromptView
from backend.runners.hf.loading import LoadOptions
from backend.runners.hf.runner import HFRunner
from backend.runners.models import resolve_model
from tests.conftest import queue_on, work_one_job

NIAH = "needle_in_haystack"
GRID = {"context_lengths": [256, 384, 512], "depth_percents": [0, 25, 50, 75, 100],
        "max_new_tokens": 12}


def _tiny(settings) -> HFRunner:
    spec = resolve_model("builtin:tiny", settings)
    return HFRunner.load(spec, LoadOptions.from_settings(settings), settings)


def _gqa_llama(settings) -> HFRunner:
    """A random Llama with grouped-query attention (8 query heads over 2 key/value
    heads), three layers, built here; the built-in model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = _tiny(settings)
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=len(tiny.tokenizer), hidden_size=96,
                         intermediate_size=192, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tiny.tokenizer.bos_token_id,
                         eos_token_id=tiny.tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    assert config.num_key_value_heads < config.num_attention_heads
    return HFRunner(tiny.spec, model, tiny.tokenizer, "cpu", 2048)


def _requests(runner: HFRunner, chat_template: bool = True, params=GRID):
    ds = get_dataset(NIAH)
    items = ds.build_items(ds.parse_params({**params, "use_chat_template": chat_template}),
                           PromptView(runner, chat_template))
    assert all(i.prefix and i.prompt.startswith(i.prefix) for i in items)
    return [GenerationRequest(i.prompt, i.max_new_tokens, chat_template, i.prefix)
            for i in items]


def _alone(runner: HFRunner, requests):
    """Each prompt in a call of its own, without any sharing."""
    runner.share_prefixes = False
    try:
        return [runner.generate([r])[0] for r in requests]
    finally:
        runner.share_prefixes = True


def _ids(generations):
    return [(g.text, g.output_tokens) for g in generations]


@pytest.mark.parametrize("build", [_tiny, _gqa_llama], ids=["builtin-tiny", "gqa-llama"])
@pytest.mark.parametrize("chat_template", [True, False])
def test_shared_prefix_answers_equal_independent_prompts(settings, with_tiny, build,
                                                         chat_template):
    runner = build(settings)
    requests = _requests(runner, chat_template)
    alone = _alone(runner, requests)
    assert any(g.output_tokens > 1 for g in alone)
    # one request per call, in the job's order (depth ascending): the kept prefix grows
    one_by_one = [runner.generate([r])[0] for r in requests]
    assert _ids(one_by_one) == _ids(alone)
    runner.forget_prefixes()
    # the whole grid in one call: deepest prefix first, results in the callers' order
    together = runner.generate(requests)
    assert _ids(together) == _ids(alone)
    assert [g.prompt_tokens for g in together] == [g.prompt_tokens for g in alone]
    # and the shared prefixes were not computed again: within one length each prompt's
    # haystack from the needle on is its own (5 depths: 3.5 of 5 prompts' tokens), and
    # the lengths share the start of the haystack too
    # (timing is the batch's, as for any batch: prompts of one length decode together)
    assert [g.extra["timing"]["batch"] for g in together] == [5] * len(together)
    computed = sum(g.extra["timing"]["prefill_tokens"] / 5 for g in together)
    reused = sum(g.extra["timing"]["shared_prefix_tokens"] / 5 for g in together)
    assert computed + reused == sum(g.prompt_tokens for g in alone)
    assert computed < 0.7 * sum(g.prompt_tokens for g in alone)


def test_prefix_split_is_in_token_space(settings, with_tiny):
    """A prefix whose last characters merge with the next token in the whole prompt's
    tokenisation is split where the two tokenisations part: the merged token is fed
    with the rest, and the answer is still the independent one."""
    runner = _tiny(settings)
    prompt = runner.render("The library opens at nine and closes at five on Sundays.")
    whole = runner.tok.prompt_ids(prompt)
    # the first cut inside the message whose tokens are not the start of the prompt's
    cut = next(c for c in range(prompt.index("library"), len(prompt))
               if whole[:len(runner.tok.prompt_ids(prompt[:c]))]
               != runner.tok.prompt_ids(prompt[:c]))
    head = runner.tok.prompt_ids(prompt[:cut])
    request = GenerationRequest(prompt, 8, True, prompt[:cut])
    n = runner._shared_length(request, whole)
    assert 0 < n < len(head) and whole[:n] == head[:n]
    assert _ids(runner.generate([request])) == _ids(_alone(runner, [request]))


def test_out_of_memory_halving_recomputes_the_prefix(settings, with_tiny, monkeypatch):
    """An out-of-memory error while continuing from a shared prefix drops the kept
    cache; the halved batches compute it again and answer as independent prompts."""
    runner = _tiny(settings)
    requests = _requests(runner, params={**GRID, "context_lengths": [384]})
    alone = _alone(runner, requests)
    real = runner.model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner.model, "forward", forward)
    halvings = []
    backoff = Backoff(4, lambda size, message: halvings.append((size, runner._prefix)))
    got = backoff.run(runner.generate, requests)
    assert halvings == [(4, None)]  # the kept prefix was gone when the batch halved
    assert backoff.size == 2
    assert _ids(got) == _ids(alone)


def _job(settings, factory, params):
    (job_id,) = [j.id for j in queue_on(factory).submit([jobs.NewJob("builtin:tiny", NIAH,
                                                                      params)])]
    return job_id


def _work(settings, job_id, factory):
    work_one_job(settings)
    return queue_on(factory).get(job_id), queue_on(factory).samples(job_id)[0]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_job_answers_as_independent_prompts_and_resumes(settings, factory, with_tiny,
                                                          batch_size):
    """Through the worker, batched or not, the predictions are those of independent
    prompts; a resumed job (some samples stored) computes the prefixes it needs again
    and answers the rest alike. Every sample keeps its own memory peak."""
    runner = _tiny(settings)
    params = {**GRID, "batch_size": batch_size}
    expected = [g.text for g in _alone(runner, _requests(runner))]
    job, samples = _work(settings, _job(settings, factory, params), factory)
    assert job.state == JobState.SUCCEEDED.value, job.error
    assert [s.prediction for s in samples] == expected
    assert all(s.peak_rss_bytes for s in samples)
    assert sum(s.fields["timing"]["shared_prefix_tokens"] for s in samples) > 0

    # a job that crashed after 7 samples: the resumed run starts mid-length, mid-depth
    resumed = _job(settings, factory, params)
    with factory() as db:
        from backend.queue.db import Sample
        for s in samples[:7]:
            db.add(Sample(job_id=resumed, idx=s.idx, prompt=s.prompt,
                          prompt_tokens=s.prompt_tokens, prediction=s.prediction,
                          score=s.score, latency_s=s.latency_s,
                          output_tokens=s.output_tokens, fields=s.fields))
        db.commit()
    job, again = _work(settings, resumed, factory)
    assert job.state == JobState.SUCCEEDED.value, job.error
    assert [s.prediction for s in again] == expected
