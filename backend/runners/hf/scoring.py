"""Log-likelihood for the transformers runner: continuations scored in padded batches
(a few-shot header shared by a batch computed once), and whole texts in rolling windows
as lm-evaluation-harness's HF backend does.
"""

from __future__ import annotations

from typing import Any

from backend.engine.contracts import move_trailing_whitespace

MIN_SHARED_PREFIX = 32
"""Tokens a batch's contexts (or prompts, in generation.py) must share before the
shared part is computed once: below that, a row-by-row prefill costs more than it saves."""


def common_length(rows: list[list[int]]) -> int:
    """Length of the longest token prefix common to every row."""
    first, n = rows[0], min(len(r) for r in rows)
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return n


def _cache_of(output):
    """The key/value cache of a forward's output (`cache` in recent transformers)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _last_tokens_only(ends, width: int):
    """A forward pre-hook for the output layer: of hidden states (rows, `width`,
    hidden), only each row's position `ends[row]`, as (rows, 1, hidden)."""
    import torch

    def hook(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[1] != width:
            return None
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return (hidden[rows, ends][:, None, :], *args[1:])
    return hook


def rolling_windows(tokens: list[int], prefix: int, max_len: int
                    ) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, predicted) windows covering every token once, each at most
    `max_len` long, the first conditioned on `prefix`: lm-eval's
    `get_rolling_token_windows(context_len=1)` followed by `make_disjoint_window`."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix] + tokens[:first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        ctx, pred = tokens[max(0, end - max_len - 1):end - 1], tokens[end - n:end]
        windows.append((ctx, pred))
        done = end
    return [(ctx[:len(ctx) - (len(pred) - 1)], pred) for ctx, pred in windows]


class Scorer:
    """HFRunner's scoring: `loglikelihood` and `loglikelihood_rolling`.

    Reads the runner's `model`, `tokenizer`, `tok` (an HFTokenizer), `device`,
    `pad_token_id` and `max_length`."""

    model: Any
    tokenizer: Any
    tok: Any
    device: str
    pad_token_id: int | None
    max_length: int

    def _split(self, request, contexts: dict | None = None
               ) -> tuple[list[int], list[int]]:
        """Context and continuation token ids. The text is split by
        `move_trailing_whitespace` (lm-evaluation-harness's rule); the tokens are cut
        where the whole text's tokens diverge from the context's, so a token merged
        across the boundary is scored with the continuation, never counted twice.
        `contexts` memoizes the context's tokens (the choices of a question share them).
        An empty context is the BOS token (else EOS), as in lm-evaluation-harness."""
        context, continuation = move_trailing_whitespace(request.context, request.continuation)
        whole = self.tok.prompt_ids(context + continuation, request.chat_template)
        key = (context, request.chat_template)
        if contexts is None or key not in contexts:
            ctx = self.tok.prompt_ids(context, request.chat_template)
            if contexts is not None:
                contexts[key] = ctx
        else:
            ctx = contexts[key]
        n = len(ctx)
        while n and whole[:n] != ctx[:n]:
            n -= 1
        if n == 0:
            prefix = (self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                      else self.tokenizer.eos_token_id)
            if prefix is not None and whole[:1] != [prefix]:
                return [prefix], whole
            n = 1  # the text starts with that token: it is the context
        return whole[:n], whole[n:]

    def loglikelihood(self, requests, batch_size: int = 1):
        """See `Runner.loglikelihood`. Distinct contexts go longest first, `batch_size`
        per forward pass, left-padded so every row ends on the last column (answer
        letters need that one column of logits: `logits_to_keep`); longer continuations
        then run on that pass's cache, right-padded. Position ids and the attention mask
        give each row what it would have alone: equal to unbatched scores within float
        rounding (1e-5 in float32)."""
        from backend.engine.contracts import Loglikelihood

        contexts: dict[tuple[str, bool], list[int]] = {}
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, request in enumerate(requests):
            ctx, cont = self._split(request, contexts)
            if not cont:
                raise ValueError(f"request {i}: the continuation has no tokens")
            if request.keep_last and len(ctx) + len(cont) > request.keep_last:
                if len(cont) >= request.keep_last:
                    raise ValueError(f"request {i}: the continuation alone is longer than "
                                     f"the {request.keep_last - 1} tokens the model can read")
                ctx = ctx[len(ctx) + len(cont) - request.keep_last:]
            groups.setdefault(tuple(ctx), []).append((i, cont))
        order = sorted(groups.items(),
                       key=lambda g: -(len(g[0]) + max(len(c) for _, c in g[1])))
        results: list[Loglikelihood | None] = [None] * len(requests)
        step = max(1, batch_size)
        for first in range(0, len(order), step):
            for i, result in self._score(order[first:first + step]):
                results[i] = result
        return results

    def _forward_takes(self, name: str) -> bool:
        """Whether the model's forward takes argument `name`: `logits_to_keep` (models
        of transformers >= 4.50) or `cache` (recent transformers; `past_key_values`
        before)."""
        if not hasattr(self, "_forward_params"):
            import inspect

            try:
                self._forward_params = set(inspect.signature(self.model.forward).parameters)
            except (TypeError, ValueError):
                self._forward_params = set()
        return name in self._forward_params

    def _score(self, batch: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]],
               share_prefix: bool = True):
        """(request index, Loglikelihood) for every continuation of the contexts in
        `batch`, from one padded pass over the contexts (and one over the longer
        continuations, if any). With `share_prefix`, a prefix of at least
        MIN_SHARED_PREFIX tokens common to every context (a few-shot prompt's header
        and examples) goes through the model once, and the padded pass covers only
        what follows it, on that prefix's cache."""
        import torch

        from backend.engine.contracts import Loglikelihood

        contexts = [list(ctx) for ctx, _ in batch]
        shared = common_length(contexts) if share_prefix and len(batch) > 1 else 0
        shared = min(shared, min(len(c) for c in contexts) - 1)  # each row keeps a token
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        longer = [(row, i, cont) for row, (_, members) in enumerate(batch)
                  for i, cont in members if len(cont) > 1]
        if not shared and not longer and self._forward_takes("logits_to_keep"):
            return self._score_causal(batch, contexts)
        rest = [c[shared:] for c in contexts]
        width = max(len(r) for r in rest)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rest], device=self.device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in rest],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        extra = {"logits_to_keep": 1} if self._forward_takes("logits_to_keep") else {}
        cache_arg = "cache" if self._forward_takes("cache") else "past_key_values"
        out_rows = []
        with torch.inference_mode():
            if shared:
                head = self.model(input_ids=torch.tensor([contexts[0][:shared]],
                                                         device=self.device),
                                  use_cache=True, **extra)
                cache = _cache_of(head)
                cache.batch_repeat_interleave(len(batch))
                extra = {**extra, cache_arg: cache}
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=bool(longer or shared), **extra)
            last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            best = last.argmax(-1).tolist()
            for row, (_, members) in enumerate(batch):
                for i, cont in members:
                    if len(cont) == 1:  # answer letters: read off the shared pass
                        out_rows.append((i, Loglikelihood(float(last[row, cont[0]]),
                                                          best[row] == cont[0], 1)))
            if not longer:
                return out_rows
            # Each longer continuation extends its context's row of the cache (rows
            # repeated when a context has several), right-padded after its last token.
            rows = torch.tensor([row for row, _, _ in longer], device=self.device)
            cache = _cache_of(out)
            cache.batch_select_indices(rows)
            steps = max(len(cont) for _, _, cont in longer) - 1
            more_ids = torch.tensor([cont[:-1] + [pad] * (steps + 1 - len(cont))
                                     for _, _, cont in longer], device=self.device)
            more_mask = torch.tensor([[1] * (len(cont) - 1) + [0] * (steps + 1 - len(cont))
                                      for _, _, cont in longer], device=self.device)
            more = self.model(
                input_ids=more_ids, attention_mask=torch.cat([mask[rows], more_mask], dim=1),
                position_ids=positions[rows, -1:] + 1 + torch.arange(steps, device=self.device),
                use_cache=True, **{cache_arg: cache})
            logps = torch.cat([last[rows][:, None],
                               torch.log_softmax(more.logits.float(), dim=-1)], dim=1)
            for k, (_, i, cont) in enumerate(longer):
                target = torch.tensor(cont, device=logps.device)
                row = logps[k, :len(cont)]
                picked = row.gather(1, target[:, None])[:, 0]
                out_rows.append((i, Loglikelihood(float(picked.sum()),
                                                  bool((row.argmax(-1) == target).all()),
                                                  len(cont))))
        return out_rows

    def _score_causal(self, batch, contexts: list[list[int]]):
        """`_score` for contexts sharing no prefix whose continuations are one token each
        (answer letters): one pass right-padded and without an attention mask, so the
        attention is the plain causal kernel (a row's tokens never see the padding after
        them) and the positions are each row's own, as lm-eval's HF backend runs it.
        The output layer sees only each row's last token (`_last_tokens_only`): logits
        for one position per row, as the left-padded pass's `logits_to_keep=1`."""
        import torch

        from backend.engine.contracts import Loglikelihood

        width = max(len(c) for c in contexts)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        ids = torch.tensor([c + [pad] * (width - len(c)) for c in contexts], device=self.device)
        ends = torch.tensor([len(c) - 1 for c in contexts], device=self.device)
        head = self.model.get_output_embeddings()
        hook = head.register_forward_pre_hook(_last_tokens_only(ends, width))
        try:
            with torch.inference_mode():
                logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=0).logits
        finally:
            hook.remove()
        if logits.shape[1] != 1:
            raise RuntimeError(f"expected one position of logits per row, got {logits.shape}")
        last = torch.log_softmax(logits[:, 0].float(), dim=-1)
        best = last.argmax(-1).tolist()
        return [(i, Loglikelihood(float(last[row, cont[0]]), best[row] == cont[0], 1))
                for row, (_, members) in enumerate(batch) for i, cont in members]

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Whole-text log-likelihoods, windowed as lm-evaluation-harness's HF backend does
        (`rolling_windows`): the text's tokens (the tokenizer's usual special tokens
        included), the first window conditioned on the BOS token (EOS without one)."""
        import torch

        prefix = (self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                  else self.tokenizer.eos_token_id)
        results = []
        with torch.inference_mode():
            for text in texts:
                results.append(sum(self._window_logprob(ctx, cont) for ctx, cont in
                                   rolling_windows(self.tokenizer.encode(text), prefix,
                                                   self.max_length)))
        return results

    def _window_logprob(self, context: list[int], predicted: list[int]) -> float:
        """The summed log-probability of `predicted` after `context` (one rolling
        window). Its logits (every position's, float32) die on return: a window's are
        never alive while the next one's forward pass runs."""
        import torch

        ids = torch.tensor([(context + predicted)[:-1]], device=self.device)
        logits = self.model(input_ids=ids).logits[0, -len(predicted):].float()
        logps = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(predicted, device=logps.device)
        return float(logps.gather(1, target[:, None]).sum())
