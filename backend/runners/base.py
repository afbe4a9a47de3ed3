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
    """Score `continuation` after `context` (both plain text, rendered already)."""

    context: str
    continuation: str


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
    def render(self, user_message: str) -> str: ...

    @abstractmethod
    def count_prompt(self, prompt: str) -> int: ...

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Greedy replies to `requests`, in order, one Generation per request.

        Raises on failure of the whole batch (out of memory included); the
        caller decides whether to retry or fail the sample.
        """

    @abstractmethod
    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[Loglikelihood]:
        """One Loglikelihood per request, in order.

        Requests that share a context are scored from one forward pass over
        that context: single-token continuations (answer letters) are read off
        its last position, longer ones continue from its cached keys/values.
        """

    @abstractmethod
    def close(self) -> None:
        """Drop every reference to the model and tokenizer and free their memory."""
