"""Greedy generation for the transformers runner: batches left-padded, the "optimized"
method's static KV cache kept between requests of one size, and requests that share a
prefix continued from one kept prefix cache instead of each computing it (see
`Generator._continue_batch`): the prefix a dataset hands over (NIAH's haystack), else
the longest common token prefix of a batch's prompts (a few-shot header and examples).
A request sent alone (batch_size 1) continues the prefix it shares with the request
before it, on the kept prefix's own cache (`Generator._continue_alone`).
"""

from __future__ import annotations

import time
from typing import Any

from backend.engine.contracts import Generation, GenerationRequest, cut_at_stop
from backend.runners.hf.account import cache_length
from backend.runners.hf.scoring import MIN_SHARED_PREFIX, common_length

LENGTH_GROUP = 0.9
"""Shared-prefix prompts decode together when the shortest is at least this share of
the longest (NIAH prompts of one context length differ by a few tokens); others would
pad too much."""


def _length_groups(prompts: list[list[int]]) -> list[list[int]]:
    """Indexes of `prompts`, longest first, in groups of about one length."""
    groups: list[list[int]] = []
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        if not groups or len(prompts[i]) < LENGTH_GROUP * len(prompts[groups[-1][0]]):
            groups.append([])
        groups[-1].append(i)
    return groups


class FirstTokenClock:
    """A logits processor that only notes when it is first called: the end of the
    prefill (the prompt's forward pass), so generation splits into prefill and decode."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.at = time.perf_counter()
        return scores


class StopCheck:
    """A stopping criterion for `generate`, checked after every new token: all rows end
    once `should_stop()` (the job cancelled or timed out; `stopped` is then set), and
    a row ends once the text of its last tokens holds one of its stop strings (as
    lm-evaluation-harness's `stop_sequences_criteria` does), so a reply is not decoded
    past its stop string up to its whole budget."""

    def __init__(self, should_stop, tokenizer, width: int,
                 stops: list[tuple[str, ...]] | None = None):
        self.should_stop = should_stop
        self.tokenizer = tokenizer
        self.width = width
        self.stops = stops if stops and any(stops) else None
        # a stop string lies within its own tokens' count (+2 for merges at its ends);
        # the rows of a batch mostly have the same stop strings: each counted once
        counted: dict[tuple[str, ...], int] = {}
        for row in self.stops or []:
            if row not in counted:
                counted[row] = max((len(tokenizer.encode(s, add_special_tokens=False))
                                    for s in row), default=0) + 2
        self.lookback = [counted[row] for row in (self.stops or [])]
        self.stopped = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.should_stop():
            self.stopped = True
            return ~done
        if self.stops:
            new = input_ids[:, self.width:].tolist()
            for row, strings in enumerate(self.stops):
                if strings:
                    tail = self.tokenizer.decode(new[row][-self.lookback[row]:])
                    done[row] = any(s in tail for s in strings)
        return done


class Generator:
    """HFRunner's generation: `generate` and the caches it keeps for a pass.

    Reads the runner's `model`, `tokenizer`, `tok` (an HFTokenizer), `device`,
    `pad_token_id`, `static_cache`, `share_prefixes`, `should_stop` and its `work_bytes`;
    keeps `_prefix` (the shared prefix of this pass), `_last_prompt` (the tokens of the
    last request sent alone), `_static` (the static cache of the size in use) and
    `_cut_back` (whether the model's cache can be cut back to a prefix)."""

    model: Any
    tokenizer: Any
    tok: Any
    device: str
    pad_token_id: int | None
    static_cache: bool
    share_prefixes: bool
    work_bytes: Any
    _prefix: tuple[tuple[int, ...], Any] | None
    _last_prompt: tuple[int, ...]
    _static: tuple[tuple[int, int], Any] | None
    _cut_back: bool | None
    should_stop: Any

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Greedy replies, all requests in one batch (left-padded).

        The batch decodes up to the largest `max_new_tokens`; each reply is cut to
        its own budget and after its first end-of-sequence token, which is what it
        would be alone under greedy decoding.
        """
        if not requests:
            return []
        prompts = [self.tok.prompt_ids(r.prompt, r.chat_template)[-r.keep_last:]
                   if r.keep_last else self.tok.prompt_ids(r.prompt, r.chat_template)
                   for r in requests]
        if self._shares_prefixes():
            if len(requests) == 1 and not requests[0].prefix:
                reused = self._reused_length(prompts[0])
                self._last_prompt = tuple(prompts[0])
                if reused:
                    return [self._continue_alone(requests[0], prompts[0], reused)]
            shared = self._shared_lengths(requests, prompts)
            if any(shared):
                return self._generate_shared(requests, prompts, shared)
        width = max(len(ids) for ids in prompts)
        max_new = max(r.max_new_tokens for r in requests)
        cache = None
        if self.static_cache:
            # The last new token is never fed back: width + max_new - 1 positions.
            cache = self._static_cache(len(requests), cache_length(width + max_new - 1))
        try:
            rows, timing, took = self._greedy(prompts, max_new, time.perf_counter(), cache,
                                              [r.stop for r in requests])
        except BaseException:
            self._static = None  # out of memory above all: no batch asks this size again
            raise
        timing.update(batch=len(requests), prefill_tokens=sum(len(p) for p in prompts))
        return [self._reply(row, request, len(ids), took / len(requests), timing)
                for row, request, ids in zip(rows, requests, prompts, strict=True)]

    def _static_cache(self, rows: int, slots: int):
        """The static KV cache for a batch of `rows` rows and `slots` positions, reset:
        the one kept from the last request when it had this shape, else a new one, made
        after the kept one is dropped (never two held: the memory account counts one
        batch's `cache_length(...)` slots per row). Reusing one cache keeps its tensors'
        addresses, which transformers marks static for a compiled decode step: on CUDA
        its graphs, recorded for those addresses, are replayed instead of recorded again
        for each request. Dropped by `forget_prefixes` (the end of a pass), `offload`
        and `close`.

        Our own cache rather than cache_implementation="static": transformers sizes that
        to the longest length the model has ever seen (generation/utils.py
        _prepare_static_cache, _previous_max_cache_length), so one 128k-token prompt
        made every later request allocate 128k slots."""
        import torch
        from transformers import StaticCache

        if self._static is not None and self._static[0] == (rows, slots):
            cache = self._static[1]
            with torch.inference_mode():  # its tensors were made under it
                cache.reset()  # zeroes keys and values, and the length written so far
            return cache
        self._static = None
        cache = StaticCache(config=self.model.config, max_cache_len=slots)
        self._static = ((rows, slots), cache)
        return cache

    def _greedy(self, prompts: list[list[int]], max_new: int, started: float,
                cache=None, stops: list[tuple[str, ...]] | None = None,
                masks: list[list[int]] | None = None) -> tuple[list[list[int]], dict, float]:
        """`prompts` left-padded into one batch (or, with `masks`, rows of one width
        laid out as those masks say) and decoded greedily up to `max_new` tokens,
        continuing `cache` when given, a row ending early at one of its `stops`: each
        row's new tokens, the prefill and decode seconds since `started`, and the
        seconds in all. Raises Stopped when the job stops meanwhile (`should_stop`)."""
        import torch

        from backend.engine.contracts import Stopped

        width = max(len(ids) for ids in prompts)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts],
                                 device=self.device)
        if masks is None:
            masks = [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts]
        mask = torch.tensor(masks, device=self.device)
        first_token = FirstTokenClock(self.device.startswith("cuda"))
        check = StopCheck(self.should_stop, self.tokenizer, width, stops)
        extra = {} if cache is None else {"cache": cache}
        with torch.inference_mode():
            # The runner chooses the cache (`cache`, else a dynamic one), never a
            # checkpoint's generation_config.cache_implementation: transformers refuses
            # it beside a cache, and its static cache is sized to the longest request
            # the model has seen (`_previous_max_cache_length`), not to this one.
            output = self.model.generate(
                input_ids=input_ids, attention_mask=mask,
                max_new_tokens=max_new, do_sample=False, cache_implementation=None,
                temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                logits_processor=[first_token], stopping_criteria=[check], **extra)
        extra.clear()
        if check.stopped:
            raise Stopped("the job was cancelled, timed out or its worker is stopping")
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        took = time.perf_counter() - started
        prefill = (first_token.at - started) if first_token.at else took
        return (output[:, width:].tolist(),
                {"prefill_s": round(prefill, 6), "decode_s": round(took - prefill, 6)}, took)

    def _reply(self, row: list[int], request: GenerationRequest, prompt_tokens: int,
               latency: float, timing: dict) -> Generation:
        """A generated row cut to the request's budget and after its first end token."""
        new_ids = row[:request.max_new_tokens]
        stops = self._eos_ids()
        end = next((i for i, t in enumerate(new_ids) if t in stops), None)
        if end is not None:
            new_ids = new_ids[:end + 1]
        text = self.tok.decode(new_ids)
        text = cut_at_stop(text, request.stop) if request.stop else text.strip()
        return Generation(text=text, prompt_tokens=prompt_tokens,
                          output_tokens=len(new_ids), latency_s=latency,
                          extra={"timing": timing})

    # --- shared prefixes (GenerationRequest.prefix) -----------------------------------

    def _shared_length(self, request: GenerationRequest, ids: list[int]) -> int:
        """How many leading tokens of the prompt's `ids` are the prefix's: the tokens the
        prefix's own tokenisation agrees on with the prompt's (a token merging across
        the boundary is left to the rest), and at least one token left to feed."""
        if not request.prefix:
            return 0
        head = self.tok.prompt_ids(request.prefix, request.chat_template)
        return min(common_length([head, ids]), len(ids) - 1)

    def _shared_lengths(self, requests: list[GenerationRequest],
                        prompts: list[list[int]]) -> list[int]:
        """Per row, the leading tokens to take from the kept prefix: a request's own
        `prefix` (`_shared_length`; the dataset's plan declared it); for the rows without
        one, their longest common token prefix when they are two or more, it is at least
        MIN_SHARED_PREFIX long (each row keeping a token to feed) and the memory account
        says that sharing it holds no more than the same rows unshared (`_sharing_fits`),
        the figure the job was admitted with."""
        shared = [self._shared_length(r, ids) for r, ids in zip(requests, prompts, strict=True)]
        plain = [i for i, r in enumerate(requests) if not r.prefix]
        if len(plain) > 1:
            rows = [prompts[i] for i in plain]
            common = min(common_length(rows), min(len(ids) for ids in rows) - 1)
            if common >= MIN_SHARED_PREFIX and self._sharing_fits(
                    [requests[i] for i in plain], rows, common):
                for i in plain:
                    shared[i] = common
        return shared

    def _sharing_fits(self, requests: list[GenerationRequest], prompts: list[list[int]],
                      shared: int) -> bool:
        """Whether the batch continued from a shared prefix of `shared` tokens holds no
        more than the same batch unshared, by the memory account (`work_bytes`): a
        batch admitted unshared never holds more for being shared."""
        from backend.engine.contracts import BatchPlan

        width = max(len(ids) for ids in prompts)
        new = max(r.max_new_tokens for r in requests)
        rows, padded = len(requests), len({len(ids) for ids in prompts}) > 1
        plain = BatchPlan("generate", rows, width, new, padded=padded)
        return (self.work_bytes(BatchPlan("generate", rows, width, new,
                                          shared_prefix=shared, padded=padded))
                <= self.work_bytes(plain))

    def _reused_length(self, ids: list[int]) -> int:
        """For a request sent alone without a prefix of its own: how many of its leading
        tokens `ids` it shares with the kept prefix or with the last request sent alone,
        whichever is longer, when that is at least MIN_SHARED_PREFIX (and a token is
        left to feed); else 0. Few-shot prompts sent one at a time share their header
        and examples from the second request on."""
        kept = self._prefix[0] if self._prefix else ()
        n = max((common_length([list(seen), ids]) for seen in (kept, self._last_prompt)
                 if seen), default=0)
        n = min(n, len(ids) - 1)
        return n if n >= MIN_SHARED_PREFIX else 0

    def _continue_alone(self, request: GenerationRequest, ids: list[int],
                        shared: int) -> Generation:
        """A request sent alone whose first `shared` tokens are (or become) the kept
        prefix: the rest of its prompt, but for its last token, is computed onto the
        kept prefix's own cache, `generate` decodes on it, and the cache is cut back to
        the prefix afterwards. No copy of the prefix is made: the request holds one
        row's cache, as it would unshared. The same greedy tokens as the whole prompt
        computed at once."""
        import torch

        started = time.perf_counter()
        try:
            kept, computed = self._kept_prefix(ids[:shared])
            if kept.get_seq_length() > shared:  # a longer kept prefix: cut to this one's
                kept.crop(shared - kept.get_seq_length())
                self._prefix = (tuple(ids[:shared]), kept)
            rest = ids[shared:-1]
            if rest:
                with torch.inference_mode():
                    self.model(input_ids=torch.tensor([rest], device=self.device),
                               cache=kept, use_cache=True, logits_to_keep=1)
            rows, timing, took = self._greedy([ids], request.max_new_tokens, started, kept,
                                              [request.stop])
            kept.crop(shared - kept.get_seq_length())  # negative: the positions to drop
        except BaseException:
            self._prefix = None  # a cache written past its prefix is never continued
            raise
        computed += len(rest)
        timing.update(batch=1, prefill_tokens=computed + 1,
                      shared_prefix_tokens=len(ids) - computed - 1)
        return self._reply(rows[0], request, len(ids), took, timing)

    def _kept_prefix(self, ids: list[int]):
        """The kept prefix's cache, made to start with the tokens `ids`, and how many of
        them had to be computed now (the caller reads the first len(ids) positions).

        One prefix is kept between calls. When `ids` is a prefix of it (a shallower
        needle: deepest first costs one prefill) it is used as it is; otherwise it is
        cut where the two part and extended by the rest of `ids` (a deeper prefix,
        another context length's haystack). The cut is a view, but the extension
        concatenates onto it, so the positions cut away are freed with the old
        tensors: one prefix is held at any time, never a copy of it."""
        import torch
        from transformers import DynamicCache

        kept_ids, kept = self._prefix or ((), None)
        common = common_length([list(kept_ids), ids])
        if kept is not None and common == len(ids):
            return kept, 0
        self._prefix = None  # out of memory while extending it: nothing half-made kept
        if kept is None or common == 0:
            kept = None  # freed before its successor is computed
            kept, common = DynamicCache(config=self.model.config), 0
        else:
            kept.crop(common - len(kept_ids))
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([ids[common:]], device=self.device),
                       cache=kept, use_cache=True, logits_to_keep=1)
        self._prefix = (tuple(ids), kept)
        return kept, len(ids) - common

    def _copy_prefix(self, ids: list[int], cache) -> int:
        """Write the kept prefix's cache of the tokens `ids` (computing what it lacks)
        into `cache`, a row of the batch; returns the tokens computed. No reference to
        the kept cache outlives the call, so when the next row's prefix replaces it the
        old one is freed before the new one is computed."""
        kept, computed = self._kept_prefix(ids)
        n = len(ids)
        for layer, held in enumerate(kept.layers):
            cache.update(held.keys[..., :n, :], held.values[..., :n, :], layer)
        return computed

    def _shares_prefixes(self) -> bool:
        """Whether requests' prefixes are shared: on, the model's own cache (the
        optimized method's static cache has no room for a second row) and layers that
        can be cut back to a prefix (`cache.can_cut_back`, read from the config
        before anything is computed)."""
        if not self.share_prefixes or self.static_cache:
            return False
        if self._cut_back is None:
            from backend.runners.hf.cache import can_cut_back

            self._cut_back = can_cut_back(self.model.config)
        return self._cut_back

    def _generate_shared(self, requests: list[GenerationRequest],
                         prompts: list[list[int]], shared: list[int]) -> list[Generation]:
        """Requests whose first `shared` tokens are a shared prefix: prompts of about one
        length decode together, each one's cache continuing from the kept prefix's
        (deepest prefix first, so one prefill serves every shallower one). The same
        greedy tokens as each whole prompt alone."""
        results: list[Generation | None] = [None] * len(requests)
        try:
            for group in _length_groups(prompts):
                group.sort(key=lambda i: -shared[i])
                common = {shared[i] for i in group}
                together = (len(group) > 1 and len(common) == 1
                            and not any(requests[i].prefix for i in group))
                method = self._continue_together if together else self._continue_batch
                for i, generation in zip(group, method(
                        [requests[i] for i in group], [prompts[i] for i in group],
                        [shared[i] for i in group]), strict=True):
                    results[i] = generation
        except BaseException:
            self._prefix = None  # out of memory above all: the retry starts from nothing
            raise
        return results

    def _continue_together(self, requests: list[GenerationRequest], prompts: list[list[int]],
                           shared: list[int]) -> list[Generation]:
        """Prompts whose first `shared[0]` tokens (the same for every row: their common
        prefix) are the kept prefix's, in one cache laid out prefix, padding, rest: the
        prefix is written into every row at once, the rests (but for each one's last
        token) are computed in one forward pass, right-aligned after the padding, and
        `generate` decodes every row on the same storage. A row's positions follow its
        attention mask, whose hole is skipped (transformers counts positions as the
        mask's running sum), so each row sees its own prompt's positions and the same
        greedy tokens as alone; two forward passes where `_continue_batch` makes one a
        row. It holds no more than the same batch unshared, the plan it was admitted
        with: the B rows' storage is that batch's cache, the rests' pass has fewer
        queries than its prefill (B x rest against B x prompt), and the kept prefix is
        one row's prefix (tests/test_auto_prefix.py checks the census against that
        plan). The memory account's shared-prefix figure models `_continue_batch`'s
        row-at-a-time pass instead, which holds less."""
        import torch

        from backend.runners.hf.cache import BatchSlots

        started = time.perf_counter()
        n = shared[0]
        rests = [ids[n:] for ids in prompts]
        width = max(len(rest) for rest in rests)
        max_new = max(r.max_new_tokens for r in requests)
        slots = BatchSlots(self.model.config, len(prompts), n + width + max_new - 1)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        masks = [[1] * n + [0] * (width - len(rest)) + [1] * len(rest) for rest in rests]
        rows = [prompts[0][:n] + [pad] * (width - len(rest)) + rest for rest in rests]
        with torch.inference_mode():
            kept, computed = self._kept_prefix(prompts[0][:n])
            cache = slots.batch(0)
            for layer, held in enumerate(kept.layers):  # one write, broadcast to every row
                cache.update(held.keys[..., :n, :], held.values[..., :n, :], layer)
            del kept, cache
            if width > 1:
                mask = torch.tensor([m[:-1] for m in masks], device=self.device)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, n:]
                self.model(input_ids=torch.tensor([row[n:-1] for row in rows],
                                                  device=self.device),
                           attention_mask=mask, position_ids=positions,
                           cache=slots.batch(n), use_cache=True, logits_to_keep=1)
        computed += sum(len(rest) - 1 for rest in rests)
        return self._shared_replies(requests, prompts, computed, *self._greedy(
            rows, max_new, started, slots.batch(n + width - 1), [r.stop for r in requests],
            masks))

    def _shared_replies(self, requests: list[GenerationRequest], prompts: list[list[int]],
                        computed: int, rows: list[list[int]], timing: dict, took: float
                        ) -> list[Generation]:
        """A shared-prefix batch's replies, its timing counting the `computed` prompt
        tokens (and each row's last, fed by `generate`) and the rest as reused."""
        total = sum(len(ids) for ids in prompts)
        timing.update(batch=len(requests), prefill_tokens=computed + len(requests),
                      shared_prefix_tokens=total - computed - len(requests))
        return [self._reply(row, request, len(ids), took / len(requests), timing)
                for row, request, ids in zip(rows, requests, prompts, strict=True)]

    def _continue_batch(self, requests: list[GenerationRequest], prompts: list[list[int]],
                        shared: list[int]) -> list[Generation]:
        """Prompts of about one length, each one's first `shared` tokens those of the
        kept prefix, built into one left-padded cache (`cache.BatchSlots`) allocated
        once for the prompts and the new tokens: a row's prefix is copied from the kept
        one and the rest of its prompt, but for its last token, computed in place; then
        `generate` feeds every row's last token and decodes them together on the same
        storage (the positions follow from the attention mask, as for any left-padded
        batch). At most B + 1 copies of one row are alive: the B rows and the kept
        prefix.

        Timing is the batch's, as for an ordinary batch: prefill and decode seconds,
        and the tokens computed and reused summed over the batch."""
        import torch

        from backend.runners.hf.cache import BatchSlots

        started = time.perf_counter()
        width = max(len(ids) for ids in prompts)
        max_new = max(r.max_new_tokens for r in requests)
        slots = BatchSlots(self.model.config, len(prompts), width + max_new - 1)
        computed = 0
        with torch.inference_mode():
            for row, (ids, n) in enumerate(zip(prompts, shared, strict=True)):
                cache = slots.row(row, start=width - len(ids))
                computed += self._copy_prefix(ids[:n], cache) if n else 0
                rest = ids[n:-1]
                if rest:
                    self.model(input_ids=torch.tensor([rest], device=self.device),
                               cache=cache, use_cache=True, logits_to_keep=1)
                computed += len(rest)
        return self._shared_replies(requests, prompts, computed, *self._greedy(
            prompts, max_new, started, slots.batch(width - 1), [r.stop for r in requests]))

    def forget_prefixes(self) -> None:
        """Drop the kept prefix cache and the kept static cache: the pass is over."""
        self._prefix = None
        self._last_prompt = ()
        self._static = None

    def _eos_ids(self) -> set[int]:
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if configured is None:
            configured = self.tokenizer.eos_token_id
        if configured is None:
            return set()
        return set(configured) if isinstance(configured, list | tuple) else {configured}
