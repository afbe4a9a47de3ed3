"""lm-evaluation-harness's model interface (`lm_eval.api.model.LM`) served by one of our
runners: the lm_eval dataset answers lm-eval's requests through it inside our worker
(model manager, batching, out-of-memory halving, memory tracking), and
`lm_eval.simple_evaluate(model=RunnerLM(runner), ...)` runs lm-eval's own loop on it.

Imports lm_eval (and so torch): only the worker's path imports this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lm_eval.api.model import LM

from backend.datasets.lm_eval_kwargs import max_gen_toks, stop_strings
from backend.engine.contracts import (
    Generation,
    GenerationRequest,
    Loglikelihood,
    LoglikelihoodRequest,
    move_trailing_whitespace,
)

log = logging.getLogger(__name__)


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's context/continuation split (`LM._encode_pair`): all trailing whitespace
    of the context moves to the continuation (`move_trailing_whitespace`, the rule every
    runner applies too). The runner then cuts the tokens where the whole text's tokens
    leave the context's: lm-eval's cut whenever the context's tokens are a prefix of the
    whole text's (no token merges across the boundary)."""
    return move_trailing_whitespace(context, continuation)


class RunnerLM(LM):
    """An lm-eval LM over our `Runner`. Prompts go as lm-eval built them: plain text with
    the tokenizer's usual special tokens, or with `chat_template` rendered in the chat
    template already (no special tokens added where the text starts with BOS).

    `run(method, requests)` calls a runner method over a list of requests; the evaluation
    loop passes its `Backoff.run`, which batches and halves batches on out-of-memory and
    puts an `OomFailure` in place of a result that does not fit alone (passed through as
    the response). Generation is greedy; the reply is cut before the first stop string,
    as lm-eval's HF backend does (`postprocess_generated_text`).

    Requests longer than `max_length` (default: the runner's context) are cut from the
    left as lm-eval's HF backend cuts them: a choice keeps the last `max_length + 1`
    tokens of context and continuation, a generation prompt its last
    `max_length - max_gen_toks`. Each cut request notes the tokens it lost
    (`lbs_truncated`) and the cuts are logged."""

    def __init__(self, runner: Any, run: Callable[[Callable, list], list] | None = None,
                 max_length: int | None = None, chat_template: bool = False):
        super().__init__()
        self.runner = runner
        self.run = run or (lambda fn, requests: fn(requests) if requests else [])
        self.max_length = min(max_length or runner.max_length, runner.max_length)
        self.chat = chat_template
        self.batched = run is not None

    def _rendered(self, text: str) -> bool:
        """Whether `text` is fed without the tokenizer's special tokens added: a prompt in
        the chat template that starts with BOS already holds it (lm-eval's `tok_encode`
        adds none to a string with the BOS prefix)."""
        bos = self.runner.prefix_token_text()
        return self.chat and bool(bos) and text.startswith(bos)

    def _prefix_text(self) -> str:
        """The text of lm-eval's `prefix_token_id` (BOS, else EOS), which conditions a
        continuation scored without context; a tokenizer reads it back as that token."""
        text = self.runner.prefix_token_text()
        if not text:
            raise ValueError("a continuation without context needs the tokenizer's BOS or "
                             "EOS token")
        return text

    def _keep(self, request: Any, text: str, keep: int) -> int | None:
        """`keep` when `text` (as the runner feeds it) is longer, noting on `request` the
        tokens the cut drops; None when it fits."""
        total = self.runner.count_prompt(text, chat_template=self._rendered(text))
        request.lbs_truncated = max(0, total - keep)
        return keep if total > keep else None

    def _log_cuts(self, requests: list[Any], kind: str) -> None:
        cut = [r.lbs_truncated for r in requests if r.lbs_truncated]
        if cut:
            log.warning("[Datasets] lm-eval: %d of %d %s request(s) longer than the context "
                        "of %d tokens lost up to %d of their earliest tokens", len(cut),
                        len(requests), kind, self.max_length, max(cut))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[Any]:
        asks = []
        for r in requests:
            context, continuation = split_pair(*(r.args if r.args[0] else
                                                 (self._prefix_text(), r.args[1])))
            keep = self._keep(r, context + continuation, self.max_length + 1)
            asks.append(LoglikelihoodRequest(context, continuation,
                                             chat_template=self._rendered(context),
                                             keep_last=keep))
        self._log_cuts(requests, "log-likelihood")
        outs = self.run(self._score, asks)
        return [(o.logprob, o.is_greedy) if isinstance(o, Loglikelihood) else o for o in outs]

    def _score(self, requests: list[LoglikelihoodRequest]) -> list[Any]:
        """One batch as `run` sized it: its contexts scored together, so the runner
        computes a prefix they share (a task's few-shot examples) once. Without a `run`,
        one context at a time."""
        return self.runner.loglikelihood(requests, batch_size=len(requests) if self.batched
                                         else 1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[Any]:
        if self.max_length < self.runner.max_length:
            raise ValueError(f"whole texts are scored in windows of the model's "
                             f"{self.runner.max_length} tokens: max_length "
                             f"{self.max_length} is not applied to them")
        return self.run(self.runner.loglikelihood_rolling, [r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[Any]:
        from backend.engine.contracts import cut_at_stop

        asks = []
        for r in requests:
            budget = max_gen_toks(r.args[1])
            if budget >= self.max_length:
                raise ValueError(f"max_gen_toks {budget} leaves no room for the prompt in a "
                                 f"context of {self.max_length} tokens")
            keep = self._keep(r, r.args[0], self.max_length - budget)
            asks.append(GenerationRequest(r.args[0], budget,
                                          chat_template=self._rendered(r.args[0]),
                                          stop=stop_strings(r.args[1]), keep_last=keep))
        self._log_cuts(requests, "generation")
        outs = self.run(self.runner.generate, asks)
        replies = []
        for request, ask, out in zip(requests, asks, outs, strict=True):
            if not isinstance(out, Generation):  # an OomFailure, passed through
                replies.append(out)
                continue
            request.lbs_tokens = (out.prompt_tokens, out.output_tokens)
            replies.append(cut_at_stop(out.text, ask.stop))
        return replies
