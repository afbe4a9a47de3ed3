"""lm-evaluation-harness's model interface (`lm_eval.api.model.LM`) served by one of our
runners: the lm_eval dataset answers lm-eval's requests through it inside our worker
(model manager, batching, out-of-memory halving, memory tracking), and
`lm_eval.simple_evaluate(model=RunnerLM(runner), ...)` runs lm-eval's own loop on it.

Imports lm_eval (and so torch): only the worker's path imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lm_eval.api.model import LM

from backend.engine.contracts import (
    Generation,
    GenerationRequest,
    Loglikelihood,
    LoglikelihoodRequest,
    move_trailing_whitespace,
)

DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's default `max_gen_toks` when a task's generation_kwargs name none."""


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's context/continuation split (`LM._encode_pair`): all trailing whitespace
    of the context moves to the continuation (`move_trailing_whitespace`, the rule every
    runner applies too). The runner then cuts the tokens where the whole text's tokens
    leave the context's: lm-eval's cut whenever the context's tokens are a prefix of the
    whole text's (no token merges across the boundary)."""
    return move_trailing_whitespace(context, continuation)


def stop_strings(gen_kwargs: dict[str, Any]) -> tuple[str, ...]:
    until = gen_kwargs.get("until") or []
    return (until,) if isinstance(until, str) else tuple(until)


def max_gen_toks(gen_kwargs: dict[str, Any]) -> int:
    """lm-eval's `normalize_gen_kwargs` priority of the generation budget's names."""
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        if gen_kwargs.get(key) is not None:
            return int(gen_kwargs[key])
    return DEFAULT_MAX_GEN_TOKS


class RunnerLM(LM):
    """An lm-eval LM over our `Runner`. Prompts go as plain text (lm-eval's default,
    without --apply_chat_template), with the tokenizer's usual special tokens.

    `run(method, requests)` calls a runner method over a list of requests; the evaluation
    loop passes its `Backoff.run`, which batches and halves batches on out-of-memory and
    puts an `OomFailure` in place of a result that does not fit alone (passed through as
    the response). Generation is greedy; the reply is cut before the first stop string,
    as lm-eval's HF backend does (`postprocess_generated_text`)."""

    def __init__(self, runner: Any, run: Callable[[Callable, list], list] | None = None):
        super().__init__()
        self.runner = runner
        self.run = run or (lambda fn, requests: fn(requests) if requests else [])
        self.batched = run is not None

    def _prefix_text(self) -> str:
        """The text of lm-eval's `prefix_token_id` (BOS, else EOS), which conditions a
        continuation scored without context; a tokenizer reads it back as that token."""
        text = self.runner.prefix_token_text()
        if not text:
            raise ValueError("a continuation without context needs the tokenizer's BOS or "
                             "EOS token")
        return text

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[Any]:
        pairs = [r.args if r.args[0] else (self._prefix_text(), r.args[1]) for r in requests]
        outs = self.run(self._score, [
            LoglikelihoodRequest(*split_pair(*pair), chat_template=False) for pair in pairs])
        return [(o.logprob, o.is_greedy) if isinstance(o, Loglikelihood) else o for o in outs]

    def _score(self, requests: list[LoglikelihoodRequest]) -> list[Any]:
        """One batch as `run` sized it: its contexts scored together, so the runner
        computes a prefix they share (a task's few-shot examples) once. Without a `run`,
        one context at a time."""
        return self.runner.loglikelihood(requests, batch_size=len(requests) if self.batched
                                         else 1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[Any]:
        return self.run(self.runner.loglikelihood_rolling, [r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[Any]:
        from backend.engine.contracts import cut_at_stop

        asks = [GenerationRequest(r.args[0], max_gen_toks(r.args[1]), chat_template=False,
                                  stop=stop_strings(r.args[1])) for r in requests]
        outs = self.run(self.runner.generate, asks)
        replies = []
        for request, ask, out in zip(requests, asks, outs, strict=True):
            if not isinstance(out, Generation):  # an OomFailure, passed through
                replies.append(out)
                continue
            request.lbs_tokens = (out.prompt_tokens, out.output_tokens)
            replies.append(cut_at_stop(out.text, ask.stop))
        return replies
