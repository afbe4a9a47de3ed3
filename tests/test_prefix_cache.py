"""What the shared-prefix path holds and computes: a batch of B prompts sharing a prefix
holds at most B + 1 copies of one row's key/value cache (the batch's rows and the one
kept prefix), measured by the storage census through `generate`; a model whose cache
cannot be cut back to a prefix (sliding-window layers) never computes a prefix it then
throws away; and a model whose generation config asks for a static cache generates on
every path, each request holding only what it needs."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from backend.engine.contracts import BatchPlan, GenerationRequest, ModelSpec
from backend.runners.builtin import build_tokenizer
from backend.runners.hf.cache import can_cut_back
from backend.runners.hf.loading import LoadOptions
from backend.runners.hf.runner import HFRunner
from backend.runners.models import resolve_model
from tests.memory_census import StorageCensus

HAY = "The grass is green. The sky is blue. The sun is yellow. Here we go again. "
NEEDLE = "The secret ingredient is paprika. "
DEPTHS = (1.0, 0.8, 0.6, 0.4, 0.2)
"""Needle depths, deepest first; every prompt has a prefix, the shallowest one shared by
all (a batch plan's `shared_prefix`)."""


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(2048)


def _runner(tokenizer, config) -> HFRunner:
    """A random model of `config` (float32, CPU) with the built-in tokenizer."""
    torch.manual_seed(0)
    cls = MistralForCausalLM if isinstance(config, MistralConfig) else LlamaForCausalLM
    model = cls(config).eval()
    return HFRunner(ModelSpec("random", None), model, tokenizer, "cpu", 4096)


def _llama(tokenizer) -> HFRunner:
    """Sixteen layers of wide key/value heads over a narrow hidden state: a row's cache
    (8 KiB a token) outweighs the activations of the forward passes, as on a real
    long-context job, so the census reads the copies of the cache."""
    return _runner(tokenizer, LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def _niah(repeats: int, depths=DEPTHS, new_tokens: int = 4, hay: str = HAY
          ) -> list[GenerationRequest]:
    """NIAH-shaped requests: one haystack, the needle at each depth, the prefix the
    haystack before it."""
    hay = hay * repeats
    requests = []
    for depth in depths:
        cut = hay.rfind(". ", 0, int(len(hay) * depth) + 1) + 2 if depth else 0
        requests.append(GenerationRequest(hay[:cut] + NEEDLE + hay[cut:] + "What is the secret?",
                                          new_tokens, chat_template=False,
                                          prefix=hay[:cut] or None))
    return requests


def _kv_bytes_per_token(runner: HFRunner) -> int:
    c = runner.model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4


def _alone(runner: HFRunner, requests):
    runner.share_prefixes = False
    try:
        return [(g.text, g.output_tokens) for g in (runner.generate([r])[0] for r in requests)]
    finally:
        runner.share_prefixes = True


@pytest.mark.parametrize("rows", [1, 5])
def test_a_shared_prefix_batch_holds_its_rows_and_one_kept_prefix(tokenizer, rows):
    """B prompts after a shared prefix peak at B + 1 copies of one row's cache (B=1:
    the kept prefix and the row), not a copy per prompt on top of the padded batch,
    and within the memory account of the batch's plan (at most 1.3 x what it holds)."""
    runner = _llama(tokenizer)
    requests = _niah(14, DEPTHS[:rows])
    expected = _alone(runner, requests)
    prompts = [runner.tok.prompt_ids(r.prompt, False) for r in requests]
    longest = max(len(ids) for ids in prompts)
    new = requests[0].max_new_tokens
    row = _kv_bytes_per_token(runner) * (longest + new)
    plan = BatchPlan("generate", rows, longest, new, padded=len(set(map(len, prompts))) > 1,
                     shared_prefix=min(runner._shared_length(r, ids)
                                       for r, ids in zip(requests, prompts, strict=True)))
    runner.forget_prefixes()
    with StorageCensus(runner.model) as census:
        got = runner.generate(requests)
    assert [(g.text, g.output_tokens) for g in got] == expected
    if rows > 1:
        assert got[0].extra["timing"]["shared_prefix_tokens"] > 0
    # what the forward passes build besides the cache (hidden states, the causal mask of
    # the longest piece computed at once, the logits of one position) is under half a
    # row's cache for this model; 2B + 1 copies would be (B + 1) + B
    assert census.peak_bytes <= (rows + 1.5) * row, (census.peak_bytes / row, census.where)
    assert census.peak_bytes <= runner.work_bytes(plan) <= 1.3 * census.peak_bytes
    # and once the call returns only the kept prefix is left
    assert census.held_bytes <= row


def test_a_replaced_prefix_is_freed_before_the_next_is_computed(tokenizer):
    """Rows of one batch after two unrelated prefixes: each time the kept prefix is
    replaced the old one is gone before the new one is computed, so the batch still
    holds its rows and one prefix."""
    runner = _llama(tokenizer)
    other = HAY.replace("grass", "river").replace("sky", "road").replace("sun", "moon")
    requests = [r for pair in zip(_niah(14, (1.0, 0.6)), _niah(14, (1.0, 0.6), hay=other),
                                  strict=True) for r in pair]
    expected = _alone(runner, requests)
    longest = max(runner.count_prompt(r.prompt, False) for r in requests)
    row = _kv_bytes_per_token(runner) * (longest + requests[0].max_new_tokens)
    runner.forget_prefixes()
    with StorageCensus(runner.model) as census:
        got = runner.generate(requests)
    assert [(g.text, g.output_tokens) for g in got] == expected
    assert got[0].extra["timing"]["batch"] == len(requests)
    assert census.peak_bytes <= (len(requests) + 1.5) * row, (census.peak_bytes / row,
                                                              census.where)


def test_sliding_window_models_never_compute_a_prefix_twice(tokenizer):
    """A model with sliding-window layers (Mistral v0.1, Gemma 2/3) cannot continue a
    prompt from another's cut-back cache: the runner knows it from the model's config
    before computing anything, so sharing costs no token through the model beyond
    what the prompts alone cost, and the replies are theirs."""
    runner = _runner(tokenizer, MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    requests = _niah(12, (0.8, 0.5, 0.2))
    fed = []
    forward = runner.model.forward

    def counting(*args, **kwargs):
        fed.append(kwargs["input_ids"].numel())
        return forward(*args, **kwargs)

    runner.model.forward = counting
    shared = [(g.text, g.output_tokens) for g in runner.generate(requests)]
    with_sharing, fed[:] = sum(fed), []
    alone = _alone(runner, requests)
    assert shared == alone
    assert with_sharing <= sum(fed)


@pytest.mark.parametrize(("config", "shares"), [
    (LlamaConfig(), True), (MistralConfig(sliding_window=None), True),
    (MistralConfig(sliding_window=4096), False),  # Mistral-7B-v0.1
    (Gemma2Config(), False), (Gemma3TextConfig(), False),  # sliding layers among full ones
], ids=["llama", "mistral-v0.3", "mistral-v0.1", "gemma2", "gemma3"])
def test_whether_prefixes_are_shared_is_read_from_the_config(config, shares):
    assert can_cut_back(config) is shares


@pytest.fixture
def static_config_tiny(settings, with_tiny):
    """builtin:tiny loaded by each method, its generation config asking for a static
    cache, as some checkpoints' generation_config.json do."""

    def load(method: str) -> HFRunner:
        spec = resolve_model("builtin:tiny", settings)
        runner = HFRunner.load(spec, LoadOptions.from_settings(settings, method), settings)
        runner.model.generation_config.cache_implementation = "static"
        return runner

    return load


def test_a_static_cache_config_generates_on_every_path(static_config_tiny):
    """The runner chooses the cache it generates on: a shared-prefix request and the
    optimized method (its own cache) answer as the plain path does, with no error
    about a cache passed alongside the config's cache_implementation."""
    default = static_config_tiny("default")
    requests = _niah(6, (1.0, 0.5), new_tokens=6)
    expected = _alone(default, requests)
    got = default.generate(requests)
    assert [(g.text, g.output_tokens) for g in got] == expected
    assert got[0].extra["timing"]["shared_prefix_tokens"] > 0
    optimized = static_config_tiny("optimized")
    plain = [GenerationRequest(r.prompt, r.max_new_tokens, False) for r in requests]
    assert [(g.text, g.output_tokens) for g in optimized.generate(plain)] == expected


def test_a_static_cache_config_holds_only_what_each_request_needs(static_config_tiny):
    """A short request after a long one holds a short request's cache: no cache sized
    to the longest prompt the model has seen (transformers' static-cache ratchet)."""
    runner = static_config_tiny("default")
    short = GenerationRequest("The sky is blue.", 4, chat_template=False)
    with StorageCensus(runner.model) as first:
        runner.generate([short])
    runner.generate([GenerationRequest(HAY * 40, 4, chat_template=False)])
    with StorageCensus(runner.model) as after_long:
        runner.generate([short])
    assert after_long.peak_bytes <= 1.1 * first.peak_bytes
