"""The runner interface: how the evaluation loop talks to a model backend.

A runner owns a loaded model and its tokenizer. Datasets see only its
`PromptTokenizer` side (see backend.datasets.base); the evaluation loop calls
`generate` and `loglikelihood`; the model manager only `HeldModel`'s methods.
Runners never know about SQL or HTTP.

A runner is a plugin, found by the scheme of the model reference a user types
(`openai:<name>`; anything else goes to the transformers runner) in
backend.runners.registry. Its class side says how to resolve, check, estimate and
load a job's model; see `Runner` and docs/adding-a-runner.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from backend.engine.memory.held import HeldModel


class JobFieldError(ValueError):
    """A job-level field (not a dataset parameter) is wrong; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class JobFieldRefused(JobFieldError):
    """A job-level field names a path outside the folders the operator allows."""


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


def _never() -> bool:
    return False


class Runner(HeldModel, ABC):
    """A loaded model behind one interface, and (on its class) how a job gets one.

    Instance side, for the evaluation loop: the PromptTokenizer methods (`encode`,
    `decode`, `render`, `count_prompt`, `max_length`), `generate`, `loglikelihood`,
    `loglikelihood_rolling`, `find_batch_size`, `forget_prefixes`, `should_stop`,
    and the memory reporting of `HeldModel`.

    Class side, for the registry (backend.runners.registry), all without loading
    anything and without torch (the server calls them at submit time): `resolve` a
    reference typed by a user, `check_job`, `model_info`, `estimate_job_bytes`
    (admission), `model_folder` (the leaderboard's identity of a model), and for the
    worker `cache_key`, `load_estimate` and `loader`.
    A class registers under its `scheme`; references `<scheme>:<rest>` go to it.
    """

    scheme: ClassVar[str] = ""
    """The registry name: the scheme of the model references it serves (`openai`)."""
    max_length: int
    should_stop: Callable[[], bool] = staticmethod(_never)
    """Set per job by the evaluation loop (a cached runner serves one job at a time):
    true once the job is cancelled, timed out or its worker stops. A runner that waits
    on something outside (a remote API) checks it and raises `Stopped`."""

    # --- class side: a job's model, before anything loads --------------------------

    @classmethod
    def resolve(cls, reference: str, settings: Any, confine: bool = True) -> ModelSpec:
        """The spec for `reference` ("<name>:<rest>"); raises runners.models.ModelNotFound
        (ModelPathRefused for a path outside the allowed folders). Default: `rest` is
        the target, which must not be empty."""
        from backend.runners.models import ModelNotFound

        target = reference.split(":", 1)[1].strip() if ":" in reference else ""
        if not target:
            raise ModelNotFound(f"give the model's name after {cls.scheme}:, "
                                f"e.g. {cls.scheme}:<model>")
        return ModelSpec(name=reference, path=None, runner=cls.scheme, target=target)

    @classmethod
    def check_job(cls, job: Any, settings: Any, confine: bool = True) -> None:
        """Refuse what this runner cannot do with `job` (an evaluation.PreparedJob whose
        `spec`, `params`, `api` options and `api_key` are set), or fill in its options
        (e.g. a base URL from the settings). Raises datasets.base.ParamError for a
        dataset parameter, JobFieldError for a job field. Default: no
        inference `methods` and no `api` options (both belong to other runners)."""
        from backend.datasets.base import ParamError

        if job.params.methods:
            raise ParamError("methods", "inference methods are for local transformers "
                                        f"models, not {cls.scheme}: models")
        if job.api is not None:
            raise JobFieldError("api", "only for openai:<name> models")

    @classmethod
    def model_folder(cls, spec: ModelSpec) -> Path | None:
        """The checkpoint folder that identifies the model of `spec` across the names jobs
        gave it (the leaderboard counts a folder named by its path and by its name under
        LBS_MODEL_DIRS as one model); None when the reference is its own identity, as an
        API model's is (default)."""
        return None

    @classmethod
    def model_info(cls, job: Any) -> Any:
        """What is known of the model before it loads (a datasets.base.ModelInfo: its
        longest sequence, None when unknown)."""
        from backend.datasets.base import ModelInfo

        return ModelInfo(job.spec.name, None)

    @classmethod
    def estimate_job_bytes(cls, job: Any, settings: Any) -> int | None:
        """GPU bytes a worker must have free for `job` (admission, scheduling.py);
        None when the job needs no GPU memory (or it is unknown): admitted anywhere."""
        return None

    @classmethod
    def cache_key(cls, job: Any, settings: Any, method: str | None) -> tuple:
        """What makes two loaded models different (the model manager's cache key);
        never holds a secret. Default: the runner and the reference."""
        return (job.spec.name, cls.scheme)

    @classmethod
    def load_estimate(cls, job: Any, settings: Any, method: str | None) -> int:
        """Bytes the loaded model will hold in this process (the manager makes room
        for them before loading). Default: 0, nothing local."""
        return 0

    @classmethod
    @abstractmethod
    def loader(cls, job: Any, settings: Any, method: str | None) -> Callable[[], Runner]:
        """The function the model manager calls to load the model of `job` (with
        inference `method`, None for the default) when it does not hold it already.
        Making the function loads nothing; calling it runs in the worker, may import
        torch, and raises on failure."""

    # --- instance side: the loaded model -------------------------------------------

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

    def loglikelihood(self, requests: list[LoglikelihoodRequest],
                      batch_size: int = 1) -> list[Loglikelihood]:
        """One Loglikelihood per request, in the order of `requests`.

        Requests that share a context are scored from one forward pass over
        that context: single-token continuations (answer letters) are read off
        its last position, longer ones continue from its cached keys/values.
        Up to `batch_size` distinct contexts go through the model together
        (longest first). Raises on failure (out of memory included) of any batch.
        Runners that cannot score a continuation say so (ValueError, the default):
        multiple-choice datasets then fail the job with that message.
        """
        raise ValueError(f"{type(self).__name__} cannot score continuations "
                         "(loglikelihood); use a generation dataset or another runner")

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """The log-likelihood of each whole text (perplexity tasks), scored in disjoint
        windows of the model's length, each predicting its tokens from the ones before.
        Runners that cannot score a text's every token say so (ValueError)."""
        raise ValueError(f"{type(self).__name__} cannot score whole texts "
                         "(loglikelihood_rolling); use a local transformers model")

    def find_batch_size(self, plan: BatchPlan) -> int:
        """The largest batch, at most `plan.rows` rows, of requests shaped as `plan` (the
        job's longest: its kind, prompt or context, new or scored tokens) that fits in
        memory: what job parameter batch_size "auto" becomes. At least 1 (a batch
        that does not fit even alone is the job's own out-of-memory to report). A
        runner with no memory of its own to probe (a remote API) takes one request at
        a time."""
        return 1

    def prefix_token_text(self) -> str | None:
        """The text of the token that conditions a continuation scored without context
        (lm-eval's `prefix_token_id`: BOS, else EOS), which the tokenizer reads back as
        that one token; None when the runner has no such token (the default)."""
        return None

    def forget_prefixes(self) -> None:
        """Drop any key/value cache kept for shared prefixes (GenerationRequest.prefix);
        the evaluation loop calls it when a pass over a job's items ends. Runners that
        keep none have nothing to do."""
        return None

    def run_settings(self) -> dict[str, Any]:
        """How this loaded model computes (device, dtype, attention, cache…), for the
        job's run manifest; JSON values, never a secret. `chat_template`: the template
        text prompts are wrapped in, if the runner renders one (hashed, not stored)."""
        return {}

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
