"""The census oracle (tests/memory_census.py) itself: it must count exactly what is
allocated inside its block and alive at once, never the weights, and see the tensors
transformers builds (the padded batch's attention mask)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.memory_census import StorageCensus


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


def test_counts_what_is_alive_together_and_forgets_what_dies():
    before = torch.ones(1000)  # made before the block: never counted
    with StorageCensus() as census:
        a = torch.zeros(1000, dtype=torch.float32)   # 4000 bytes
        b = a + before                                # 4000 more, both alive
        del a
        c = b.view(10, 100) * 2                       # a gets freed first: still 8000
        view = b[:10]                                 # a view adds no storage
        del b
    assert census.peak_bytes == 8000
    assert census.held_bytes == 4000 + 4000  # c, and b's storage kept by its view
    del view
    assert census.held_bytes == 4000
    del c
    assert census.held_bytes == 0


def test_weights_are_not_counted_but_the_padded_mask_is():
    model = _llama()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows, width = 4, 256
    ids = torch.randint(0, 16000, (rows, width))
    peaks = {}
    for padded in (False, True):
        mask = torch.ones(rows, width, dtype=torch.long)
        if padded:
            mask[0, :7] = 0
        with StorageCensus(model) as census, torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        peaks[padded] = census.peak_bytes
        assert census.held_bytes == 0  # the output was dropped with the statement
    assert peaks[False] < weights  # the weights (8 MiB here) are not in it
    # transformers materialises a [B, 1, T, T] boolean mask only once a row is padded
    assert peaks[True] - peaks[False] == rows * width * width
