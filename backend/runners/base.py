"""The runner interface: how the evaluation loop talks to a model backend.

A runner owns a loaded model and its tokenizer. Datasets see only its
`PromptTokenizer` side (see backend.datasets.base); the evaluation loop calls
`generate`. Runners never know about jobs, SQL or HTTP.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


class Stopped(Exception):
    """A runner gave up waiting because its job asked it to stop (cancelled, timed out,
    or the worker is shutting down); nothing is wrong with the model."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, already rendered (chat template applied if wanted)."""

    prompt: str
    max_new_tokens: int
    chat_template: bool = True
    """How `prompt` was rendered (`Runner.render(..., chat_template=)`): with the chat
    template, whose text already holds the special tokens (BOS…), or as plain text, to
    which the runner adds its tokenizer's usual special tokens."""
    prefix: str | None = None
    """A leading part of `prompt` that other requests of the job share (NIAH: the rendered
    text before the needle). A runner may compute its keys/values once and continue each
    prompt from a copy of them; the reply is the one the whole prompt alone would get.
    The split is made in token space: only tokens the prompt's own tokenisation shares
    with the prefix's are reused, so a token merging across the boundary is recomputed."""
    stop: tuple[str, ...] = ()
    """Stop strings: when given, the reply is cut before the first one it holds and kept
    as decoded (not stripped), the way lm-evaluation-harness reads a generation."""


@dataclass(frozen=True)
class Generation:
    """The model's reply to one request.

    `prompt_tokens` is what the model was fed (special tokens included),
    `output_tokens` what it produced; `latency_s` is wall time for this request
    (for a batch, the batch's time shared out evenly).
    """

    text: str
    prompt_tokens: int
    output_tokens: int
    latency_s: float
    extra: dict | None = None
    """Backend-specific facts kept with the sample (an API model: usage, attempts)."""


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score `continuation` after `context` (both plain text, rendered already).

    Every runner splits the pair by `move_trailing_whitespace` first."""

    context: str
    continuation: str
    chat_template: bool = True
    """How `context` was rendered (see GenerationRequest.chat_template)."""


def move_trailing_whitespace(context: str, continuation: str) -> tuple[str, str]:
    r"""The one rule for where a log-likelihood request's context ends: all trailing
    whitespace of the context (spaces, tabs, newlines: `str.rstrip()`) moves to the
    front of the continuation, so "答案：\n" + "A" is scored as "\n" + "A" after "答案：".

    It is lm-evaluation-harness's rule (`TemplateLM._encode_pair`), so log-likelihoods
    are comparable with its figures, and the one tokenizers need: most attach leading
    whitespace to the next word ("▁A", " A", "\tA"), so a context tokenized with its
    trailing whitespace would end in a token that the whole text never contains. Where
    the whitespace is a token of its own, its log-probability is the same for every
    choice after one context, so the chosen answer does not change with the rule; C-Eval
    (its official scorer reads the letter's logit right after "答案：") is unaffected,
    its prompts end in no whitespace.
    """
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


@dataclass(frozen=True)
class Loglikelihood:
    """Sum of the continuation tokens' log-probabilities, whether greedy decoding
    would have produced exactly them, and how many tokens they are."""

    logprob: float
    is_greedy: bool
    tokens: int


class Runner(ABC):
    """A loaded model. Subclasses implement the PromptTokenizer methods and generate."""

    max_length: int

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def render(self, user_message: str, chat_template: bool = True) -> str:
        """The prompt for one user message: in the chat template when `chat_template`
        and the model has one, else the message as is."""

    @abstractmethod
    def count_prompt(self, prompt: str, chat_template: bool = True) -> int:
        """Tokens the model is fed for `prompt`, rendered with `chat_template` or not."""

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Greedy replies to `requests`, in order, one Generation per request.

        Raises on failure of the whole batch (out of memory included); the
        caller decides whether to retry or fail the sample.
        """

    @abstractmethod
    def loglikelihood(self, requests: list[LoglikelihoodRequest],
                      batch_size: int = 1) -> list[Loglikelihood]:
        """One Loglikelihood per request, in the order of `requests`.

        Requests that share a context are scored from one forward pass over
        that context: single-token continuations (answer letters) are read off
        its last position, longer ones continue from its cached keys/values.
        Up to `batch_size` distinct contexts go through the model together
        (longest first). Raises on failure (out of memory included) of any batch.
        """

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """The log-likelihood of each whole text (perplexity tasks), scored in disjoint
        windows of the model's length, each predicting its tokens from the ones before.
        Runners that cannot score a text's every token say so (ValueError)."""
        raise ValueError(f"{type(self).__name__} cannot score whole texts "
                         "(loglikelihood_rolling); use a local transformers model")

    def find_batch_size(self, context_tokens: int, continuation_tokens: int,
                        start: int) -> int:
        """The largest batch (at most `start`, halving from it) of `context_tokens`-token
        contexts, each followed by `continuation_tokens` scored tokens, that fits in
        memory: what job parameter batch_size "auto" becomes. A runner with no memory
        of its own to probe (a remote API) takes one request at a time."""
        return 1

    def forget_prefixes(self) -> None:
        """Drop any key/value cache kept for shared prefixes (GenerationRequest.prefix);
        the evaluation loop calls it when a pass over a job's items ends. Runners that
        keep none have nothing to do."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Drop every reference to the model and tokenizer and free their memory."""


class PromptView:
    """A runner as one job's dataset sees it (the PromptTokenizer protocol): prompts
    rendered with or without the chat template, as the job asked.

    The choice is a rendering option carried by each request, not a second runner:
    this view holds the runner, never the model, so when the model manager releases
    the runner (closing it) nothing here keeps the weights alive.
    """

    def __init__(self, runner: Runner, chat_template: bool = True):
        self.runner = runner
        self.chat_template = chat_template

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    def encode(self, text: str) -> list[int]:
        return self.runner.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.runner.decode(ids)

    def render(self, user_message: str) -> str:
        return self.runner.render(user_message, chat_template=self.chat_template)

    def count_prompt(self, prompt: str) -> int:
        return self.runner.count_prompt(prompt, chat_template=self.chat_template)
