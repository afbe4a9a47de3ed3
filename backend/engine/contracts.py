"""The vocabulary the engine, its runners and its datasets share.

Runners (backend/runners) and datasets (backend/datasets) are plugins: they import
this module and `backend.common`, never each other, the evaluation loop or the memory
internals (tests/test_layers.py holds them to it). What is here:

- errors a plugin raises and the engine reads: `ParamError` (a dataset parameter;
  `PathRefused` for a path outside the allowed folders), `JobFieldError` (a job-level
  field; `JobFieldRefused`), `ModelNotFound` (`ModelPathRefused`), `Stopped`, the
  out-of-memory test `is_out_of_memory` and `OomFailure`, what stands in for a result
  that did not fit;
- what is known of a model before it loads: `ModelSpec` (a resolved reference),
  `ModelInfo` (its longest sequence);
- the requests a dataset makes of a runner and their results: `GenerationRequest` /
  `Generation`, `LoglikelihoodRequest` / `Loglikelihood`, with the text rules every
  runner applies (`move_trailing_whitespace`, `cut_at_stop`), and `BatchPlan`, one
  batch as the memory account sees it;
- `PromptTokenizer`, the model's tokenizer as a dataset sees it; `HeldModel`, what the
  model manager asks of a loaded model; `CacheMode`, what happens to a model after a
  dataset's job; `JobPlan`, what a runner's class side reads of a prepared job.

It imports nothing else of ours.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# --- errors ---


class ParamError(ValueError):
    """A parameter is wrong; `field` names it (dotted path inside `params`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PathRefused(ParamError):
    """A path parameter outside the folders the server may read (API answer 403)."""


class JobFieldError(ValueError):
    """A job-level field (not a dataset parameter) is wrong; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class JobFieldRefused(JobFieldError):
    """A job-level field names a path outside the folders the operator allows."""


class ModelNotFound(LookupError):
    """The model is neither built in, nor a checkpoint folder, nor in the hub cache."""


class ModelPathRefused(ModelNotFound):
    """A model folder outside LBS_MODEL_DIRS (or a path with `..`)."""


class Stopped(Exception):
    """A runner gave up waiting because its job asked it to stop (cancelled, timed out,
    or the worker is shutting down); nothing is wrong with the model."""


_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory",
                # cuBLAS, cuSPARSE, cuSOLVER and cuDNN 8 statuses (CUBLAS_STATUS_ALLOC_FAILED,
                # CUDNN_STATUS_ALLOC_FAILED), cuDNN 9's CUDNN_STATUS_INTERNAL_ERROR_HOST_/
                # DEVICE_ALLOCATION_FAILED: a handle or workspace that did not fit
                "_alloc_failed", "_allocation_failed")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or an allocator's RuntimeError
    (the CPU allocator says "DefaultCPUAllocator: can't allocate memory"; torch's
    cuBLAS check "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling ...", its cuDNN
    check "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"): what the evaluation loop halves a
    batch on, and what a runner probing for its batch size halves on."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


@dataclass(frozen=True)
class OomFailure:
    """In place of a result: the request did not fit in memory even alone."""

    message: str


# --- a model before it loads ---


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model reference: `name` as the user wrote it, `runner` the scheme of
    the runner that serves it (backend.runners.registry). For the transformers runner
    `path` is a local folder (None for a built-in model not yet made, or a hub id to
    download); for a plugin runner `target` is what follows its scheme (`openai:gpt-4o`
    -> "gpt-4o")."""

    name: str
    path: Path | None
    builtin: str | None = None
    hub_id: str | None = None
    runner: str = "hf"
    target: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What is known of a model before it is loaded (from its config.json)."""

    name: str
    max_length: int | None


class CacheMode(str, enum.Enum):
    """What happens to the model after a job of this dataset.

    CACHED keeps it loaded for the next job of the same model; UNCACHED releases
    it fully after the job (long-context datasets that need every byte).
    """

    CACHED = "cached"
    UNCACHED = "uncached"


# --- requests and results ---


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
    keep_last: int | None = None
    """When set, only the prompt's last `keep_last` tokens (as the runner tokenizes it,
    special tokens included) are fed: the dataset's left truncation of a prompt longer
    than the model's context (lm-evaluation-harness keeps `max_length - max_gen_toks`)."""


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
    keep_last: int | None = None
    """When set, at most `keep_last` tokens of context and continuation together are
    read, the earliest context tokens dropped: the dataset's left truncation
    (lm-evaluation-harness keeps `max_length + 1`, so the model is fed `max_length`)."""


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


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` before the first occurrence of each non-empty stop string in turn (the
    rule of lm-evaluation-harness's `postprocess_generated_text`)."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


@dataclass(frozen=True)
class Loglikelihood:
    """Sum of the continuation tokens' log-probabilities, whether greedy decoding
    would have produced exactly them, and how many tokens they are."""

    logprob: float
    is_greedy: bool
    tokens: int


@dataclass(frozen=True)
class BatchPlan:
    """One request batch as a runner will run it, for the memory account: what it holds
    on the device beyond the weights is the runner's `work_bytes(plan)`, read by
    admission (the job's worst batch) and by the code that allocates it.

    `kind` is "generate" (a prompt then `new_tokens` decoded tokens), "loglikelihood"
    (a context then a scored continuation of `new_tokens` tokens) or "rolling" (one
    window of `prompt_tokens` scored at every position)."""

    kind: str
    rows: int
    """Rows in the batch (B)."""
    prompt_tokens: int
    """The longest row's prompt or context, in tokens, the shared prefix included."""
    new_tokens: int = 1
    """Tokens generated after the prompt, or the longest scored continuation."""
    shared_prefix: int = 0
    """Leading tokens every row shares that are computed once and kept (0: none)."""
    padded: bool = True
    """Rows differ in length, so an attention mask over the padding is built."""
    logits_positions: int = 1
    """Positions per row whose logits the pass asks for (1: the last one only)."""
    method: str = "default"
    """The inference method ("default", "basic": eager attention, "optimized")."""
    continuations: int = 0
    """Log-likelihood: continuations longer than one token in the whole batch (the
    choices of its questions), each continuing its own copy of its context's row of
    the cache (0: one per row)."""


# --- what datasets and the model manager see of a runner ---


class PromptTokenizer(Protocol):
    """The model's tokenizer as a dataset sees it."""

    max_length: int
    """Most tokens the model takes (prompt plus generated tokens)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a piece of text, without special tokens."""

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""

    def render(self, user_message: str) -> str:
        """The full prompt text the model is fed for one user message: the chat
        template with its generation prompt when one is in use, else the message."""

    def count_prompt(self, prompt: str) -> int:
        """Tokens the model is fed for a rendered prompt (special tokens included)."""

    def render_chat(self, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True) -> str:
        """A conversation (`[{"role", "content"}, ...]`) in the model's chat template, as
        text: with the assistant's generation prompt, or else continuing the last
        message. Raises ValueError when the model has no chat template."""


class HeldModel:
    """What the model manager (backend.engine.memory.manager) asks of a model it holds.

    The defaults describe a model that holds nothing locally (a remote API): no
    bytes, not on a GPU, nothing to move. A runner with weights in this process
    overrides them all (see HFRunner).
    """

    device: str = "cpu"
    """Where the weights are now: "cuda:<i>" puts the model on the manager's GPU list."""
    host_pinned: bool = False
    """Whether the CPU copy kept by `offload` is in pinned memory (counted against
    the pinned budget)."""

    def size_bytes(self) -> int:
        """Bytes of the weights (one copy), wherever they are."""
        return 0

    def host_bytes(self) -> int:
        """RAM a kept CPU copy holds while the model is on the GPU."""
        return 0

    def ram_bytes(self) -> int:
        """RAM the weights hold now: all of them on the CPU, else the kept CPU copy.
        A job's own memory counts these, so a model already loaded counts as if the
        job had loaded it."""
        return self.host_bytes() if str(self.device).startswith("cuda") else self.size_bytes()

    def pinned_bytes(self) -> int:
        """Pinned host memory an `offload(pin=True)` would take."""
        return self.size_bytes()

    def movable(self) -> bool:
        """Whether `offload`/`restore` can move the model; a model that cannot be moved
        (a device map over several GPUs, or nothing local) is released instead."""
        return False

    def offload(self, pin: bool) -> int:
        """Move the weights to CPU RAM (pinned when `pin`); bytes copied."""
        return 0

    def restore(self, device: str = "cuda:0", background: bool = False) -> int:
        """Move the weights back to `device`; bytes copied. `background`: another job
        runs meanwhile (a prefetch), so the copy should not wait behind its work."""
        return 0

    def close(self) -> None:
        """Drop every reference to the model and tokenizer so their memory can be freed."""
        return None


@dataclass(frozen=True)
class JobOptions:
    """A job's runner options as its runner checked them (`Runner.check_job`): `api`,
    the runner's own options (the openai runner's ApiOptions, its base URL filled in
    from the settings), and the `api_key` the job runs with."""

    api: Any = None
    api_key: str | None = None


class PlannedDataset(Protocol):
    """A job's dataset as a runner's memory account sees it."""

    name: str

    def worst_batches(self, params: Any, model_max: int | None) -> list[BatchPlan]:
        """The job's request batches that may hold the most memory."""


class JobParams(Protocol):
    """The job parameters a runner's class side reads (every dataset's have them)."""

    @property
    def methods(self) -> list[str] | None: ...

    @property
    def batch_size(self) -> int | str: ...


class JobPlan(Protocol):
    """A prepared job (engine.evaluation.PreparedJob) as a runner's class side reads it,
    before anything loads: the resolved model, what is known of it, the dataset and its
    validated parameters, the runner's own options and key, and the GPUs it asked for."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def info(self) -> ModelInfo: ...

    @property
    def dataset(self) -> PlannedDataset: ...

    @property
    def params(self) -> JobParams: ...

    @property
    def api(self) -> Any:
        """The runner's own options (the openai runner's ApiOptions), None without."""

    @property
    def api_key(self) -> str | None: ...

    @property
    def num_gpus(self) -> int: ...


class LoadedModel(Protocol):
    """A loaded model as a dataset that answers its items itself sees it (`Dataset.answer`):
    the calls it may make, nothing of devices or memory."""

    max_length: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]: ...

    def loglikelihood(self, requests: list[LoglikelihoodRequest],
                      batch_size: int = 1) -> list[Loglikelihood]: ...

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]: ...

    def prefix_token_text(self) -> str | None: ...

    def count_prompt(self, prompt: str, chat_template: bool = True) -> int: ...


BatchRun = Callable[[Callable[[list[Any]], list[Any]], list[Any]], list[Any]]
"""`run(method, requests)`: a model method called on requests in batches, halving a batch
on out-of-memory; an `OomFailure` stands in for a result that does not fit alone."""


@dataclass
class DatasetAnswer:
    """A dataset's answer to one of its items (`Dataset.answer`): the text scored, the
    tokens fed and produced, the fields stored with the sample, and an error in place of
    an answer (the item did not fit in memory)."""

    text: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
