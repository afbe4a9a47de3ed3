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
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from backend.engine.contracts import (
    BatchPlan,
    Generation,
    GenerationRequest,
    HeldModel,
    JobFieldError,
    JobOptions,
    JobPlan,
    Loglikelihood,
    LoglikelihoodRequest,
    ModelInfo,
    ModelNotFound,
    ModelSpec,
    ParamError,
)

if TYPE_CHECKING:
    from backend.common.config import Settings


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
    true once the job is cancelled, timed out or its worker stops. A runner checks it
    while it waits on something outside (a remote API) or generates (the transformers
    runner: after every new token) and raises `Stopped`."""

    # --- class side: a job's model, before anything loads --------------------------

    @classmethod
    def resolve(cls, reference: str, settings: Settings, confine: bool = True) -> ModelSpec:
        """The spec for `reference` ("<name>:<rest>"); raises contracts.ModelNotFound
        (ModelPathRefused for a path outside the allowed folders). Default: `rest` is
        the target, which must not be empty."""
        target = reference.split(":", 1)[1].strip() if ":" in reference else ""
        if not target:
            raise ModelNotFound(f"give the model's name after {cls.scheme}:, "
                                f"e.g. {cls.scheme}:<model>")
        return ModelSpec(name=reference, path=None, runner=cls.scheme, target=target)

    @classmethod
    def check_job(cls, job: JobPlan, settings: Settings, confine: bool = True) -> JobOptions:
        """Refuse what this runner cannot do with `job` (a preparation.PreparedJob whose
        `spec`, `params`, `api` options and `api_key` are set), and return the options
        it runs with, filled in (e.g. a base URL from the settings). Raises
        contracts.ParamError for a dataset parameter, JobFieldError for a job field.
        Default: no inference `methods` and no `api` options (both belong to other
        runners)."""
        if job.params.methods:
            raise ParamError("methods", "inference methods are for local transformers "
                                        f"models, not {cls.scheme}: models")
        if job.api is not None:
            raise JobFieldError("api", "only for openai:<name> models")
        return JobOptions(None, job.api_key)

    @classmethod
    def model_folder(cls, spec: ModelSpec) -> Path | None:
        """The checkpoint folder that identifies the model of `spec` across the names jobs
        gave it (the leaderboard counts a folder named by its path and by its name under
        LBS_MODEL_DIRS as one model); None when the reference is its own identity, as an
        API model's is (default)."""
        return None

    @classmethod
    def model_info(cls, job: JobPlan) -> ModelInfo:
        """What is known of the model before it loads (a contracts.ModelInfo: its
        longest sequence, None when unknown)."""
        return ModelInfo(job.spec.name, None)

    @classmethod
    def estimate_job_bytes(cls, job: JobPlan, settings: Settings) -> int | None:
        """GPU bytes a worker must have free for `job` (admission, scheduling.py);
        None when the job needs no GPU memory (or it is unknown): admitted anywhere."""
        return None

    @classmethod
    def cache_key(cls, job: JobPlan, settings: Settings, method: str | None) -> tuple:
        """What makes two loaded models different (the model manager's cache key);
        never holds a secret. Default: the runner and the reference."""
        return (job.spec.name, cls.scheme)

    @classmethod
    def load_estimate(cls, job: JobPlan, settings: Settings, method: str | None) -> int:
        """Bytes the loaded model will hold in this process (the manager makes room
        for them before loading). Default: 0, nothing local."""
        return 0

    @classmethod
    @abstractmethod
    def loader(cls, job: JobPlan, settings: Settings,
               method: str | None) -> Callable[[], Runner]:
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

    def render_chat(self, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True) -> str:
        """A conversation in the model's chat template (PromptTokenizer.render_chat);
        default: the runner has none (ValueError)."""
        raise ValueError(f"{type(self).__name__} renders no chat template")

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

    def render_chat(self, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True) -> str:
        return self.runner.render_chat(messages, add_generation_prompt)
