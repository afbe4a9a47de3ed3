"""Key/value caches the transformers runner lays out itself (imports torch and
transformers: only the runner's instance side imports this module).

A batch of prompts that share a prefix is built row by row in one left-padded cache,
allocated once for the whole generation (`BatchSlots`): each row's prefix is copied
from the one kept prefix cache, the rest of its prompt is computed straight into its
row, then `generate` decodes every row on the same storage. So the batch holds its B
rows and the kept prefix, B + 1 copies of one row at most (the memory account's
figure), and decoding adds no copy: a DynamicCache concatenates at every step, with
the old and the new layer alive together.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


def can_cut_back(config) -> bool:
    """Whether every layer of the model's dynamic cache keeps every position (a plain
    DynamicLayer), so a prompt's cache cut back to a prefix can be continued by another
    prompt. Sliding-window and chunked layers drop what slides out of the window, and
    linear-attention or shared layers hold no per-position keys: on such a model a
    prefix is never shared. Read from the config; nothing is computed."""
    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class BatchSlots:
    """Keys and values of a left-padded batch, for a model of `config`, of `rows` rows
    and `positions` positions each (the longest prompt plus the new tokens, less the
    last token, which is never fed back): one tensor per layer, allocated at the
    layer's first write (its heads, head size, dtype and device are those written) and
    zeroed, since a padded position is masked out but a masked 0 x NaN from
    uninitialised memory would still be NaN.

    `row(i, start)` is a cache for row i alone, whose positions begin at `start` (the
    row's padding ends there): a forward pass on it writes the row in place. `batch(n)`
    is a cache of every row with `n` positions filled, for `generate` to continue."""

    def __init__(self, config, rows: int, positions: int):
        self.rows, self.positions = rows, positions
        layers = len(DynamicCache(config=config).layers)
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    def storage(self, layer: int, keys: torch.Tensor, values: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            self.keys[layer] = keys.new_zeros(
                (self.rows, keys.shape[1], self.positions, keys.shape[-1]))
            self.values[layer] = values.new_zeros(
                (self.rows, values.shape[1], self.positions, values.shape[-1]))
        return self.keys[layer], self.values[layer]

    def row(self, index: int, start: int) -> Cache:
        return Cache(layers=[SlotLayer(self, layer, slice(index, index + 1), start, start)
                             for layer in range(len(self.keys))])

    def batch(self, filled: int) -> Cache:
        return Cache(layers=[SlotLayer(self, layer, slice(None), 0, filled)
                             for layer in range(len(self.keys))])


class SlotLayer(DynamicLayer):
    """One layer of a cache over `BatchSlots` storage (its rows `rows`, positions from
    `start`): `update` writes the new keys and values after the `end` already filled and
    returns a view of positions start..end, what a DynamicLayer returns, without
    concatenating into a new tensor."""

    def __init__(self, slots: BatchSlots, layer: int, rows: slice, start: int, end: int):
        super().__init__()
        self.slots, self.layer, self.rows = slots, layer, rows
        self.start, self.end = start, end
        if slots.keys[layer] is not None:
            self._view(slots.keys[layer], slots.values[layer])

    def _view(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys[self.rows, :, self.start:self.end]
        self.values = values[self.rows, :, self.start:self.end]
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.slots.storage(self.layer, key_states, value_states)
        end = self.end + key_states.shape[-2]
        if end > self.slots.positions:
            raise ValueError(f"the batch's cache has {self.slots.positions} positions; "
                             f"writing {key_states.shape[-2]} after {self.end} overflows it")
        keys[self.rows, :, self.end:end] = key_states
        values[self.rows, :, self.end:end] = value_states
        self.end = end
        self._view(keys, values)
        return self.keys, self.values
