"""Models behind an OpenAI-compatible HTTP API (`openai:<served model name>`).

The model runs elsewhere; this runner sends each prompt to `<base_url>/chat/completions`
(the server applies its chat template) or `<base_url>/completions` (the prompt as
is), a bounded number at a time, retrying 429, 5xx, timeouts and unreadable answers
with exponential backoff. Token usage, latency and attempts are kept per request.

Datasets build prompts in a local tokenizer's tokens (`tokenizer`: the model's own
tokenizer folder or cached hub id, else the built-in tiny model's, so NIAH lengths
are then approximate for the remote model). The completions endpoint gets the prompt
a local run would tokenise: the tokenizer's chat template only where the dataset and
job want one.

Log-likelihood needs the completions endpoint to echo the prompt with its token
log-probabilities (`echo` + `logprobs`, as vLLM, llama.cpp's server and the legacy
OpenAI completions API do). The runner asks for one generated token (`max_tokens: 0`
means "until the context is full" to llama-cpp-python), sums only the echoed prompt
tokens that spell the continuation, and checks that they do; an endpoint that returns
no prompt log-probabilities (`transformers serve`) is named on the first request.

The key, the hosts a job may reach and the options are options.py's; the requests,
their retries and the stop that ends them transport.py's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from backend.common.config import Settings
from backend.common.redact import mask_url
from backend.engine.contracts import (
    Generation,
    GenerationRequest,
    JobFieldError,
    JobFieldRefused,
    JobOptions,
    JobPlan,
    Loglikelihood,
    LoglikelihoodRequest,
    ModelInfo,
    ModelSpec,
    move_trailing_whitespace,
)
from backend.runners.base import Runner
from backend.runners.openai.options import ApiOptions, effective_options, key_for
from backend.runners.openai.transport import RETRY_STATUS, ApiClient, ApiStats, RemoteApiError

log = logging.getLogger(__name__)

PREFIX = "openai:"


NO_PROMPT_LOGPROBS = (
    "this endpoint must return prompt log-probabilities for log-likelihood scoring (the "
    "completions endpoint with echo + logprobs, as vLLM and llama.cpp's server do)")
NO_CHAT_TEMPLATE_HINT = (
    "if the served model has no chat template, set api.endpoint \"completions\" (the "
    "prompt is then sent as is)")


def _never() -> bool:
    return False


class OpenAIRunner(Runner):
    """A served model. `tokenizer` is a PromptTokenizer-like object (HFTokenizer).

    It holds no weights here: the memory reporting is HeldModel's (0 bytes, nothing
    to move), and admission admits its jobs anywhere (no GPU memory needed)."""

    scheme = "openai"
    device = "remote"

    # --- class side (the runner registry; no torch) ------------------------------------

    @classmethod
    def resolve(cls, reference: str, settings: Settings, confine: bool = True) -> ModelSpec:
        from backend.engine.contracts import ModelNotFound

        served = reference.split(":", 1)[1].strip()
        if not served:
            raise ModelNotFound("give the served model's name after openai:, e.g. openai:gpt-4o")
        return ModelSpec(name=reference, path=None, runner=cls.scheme, target=served)

    @classmethod
    def check_job(cls, job: JobPlan, settings: Settings, confine: bool = True) -> JobOptions:
        """No inference methods; the job's `api` options (an ApiOptions, or its dict as
        stored with the job) with the settings' base URL filled in, an allowed host and
        a tokenizer that resolves; the key from the options when none is given apart."""
        from backend.engine.contracts import ModelNotFound, ModelPathRefused, ParamError
        from backend.runners.models import resolve_model

        if job.params.methods:
            raise ParamError("methods", "inference methods are for local transformers "
                                        "models, not openai: models")
        api = ApiOptions.model_validate(job.api) if isinstance(job.api, dict) else job.api
        try:
            api = effective_options(api, settings)
        except ValueError as exc:
            raise JobFieldError("api.base_url", str(exc)) from None
        if api.tokenizer:
            try:
                resolve_model(api.tokenizer, settings, confine=confine)
            except ModelPathRefused as exc:
                raise JobFieldRefused("api.tokenizer", str(exc)) from None
            except ModelNotFound as exc:
                raise JobFieldError("api.tokenizer", str(exc)) from None
        key = job.api_key
        if key is None and api.api_key is not None:
            key = api.api_key.get_secret_value()
        return JobOptions(api, key)

    @classmethod
    def model_info(cls, job: JobPlan) -> ModelInfo:
        from backend.engine.contracts import ModelInfo

        # known once the runner (its tokenizer) is made, unless the job says
        return ModelInfo(job.spec.name, job.api.max_length)

    @classmethod
    def cache_key(cls, job: JobPlan, settings: Settings, method: str | None) -> tuple:
        """Its options, and a digest of its key (never the key)."""
        import hashlib

        digest = hashlib.sha256((job.api_key or "").encode()).hexdigest()[:16]
        return (job.spec.name, "openai", json.dumps(job.api.public(), sort_keys=True), digest)

    @classmethod
    def loader(cls, job: JobPlan, settings: Settings, method: str | None
               ) -> Callable[[], OpenAIRunner]:
        from functools import partial

        return partial(load_api_runner, job.spec.name, job.api, job.api_key, settings)

    # --- instance side -----------------------------------------------------------------

    def run_settings(self) -> dict[str, Any]:
        from urllib.parse import urlsplit

        url = urlsplit(self.options.base_url or "")
        return {"device": "remote", "served_model": self.served_model,
                "endpoint": self.options.endpoint,
                "server": f"{url.scheme}://{url.hostname}:{url.port}" if url.port
                else f"{url.scheme}://{url.hostname}"}

    def __init__(self, name: str, served_model: str, options: ApiOptions, api_key: str | None,
                 tokenizer: Any, max_length: int):
        self.name = name
        self.served_model = served_model
        self.options = options
        self.tok = tokenizer
        self.max_length = max_length
        self.stats = ApiStats()
        self.use_chat = options.endpoint == "chat"
        self.should_stop: Callable[[], bool] = _never
        """Set per job by the evaluation loop: true once the job is cancelled, timed
        out or its worker stops; waiting requests then raise `Stopped`."""
        self.client = ApiClient(options, api_key, self.stats, lambda: self.should_stop())

    # --- PromptTokenizer ----------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def render(self, user_message: str, chat_template: bool = True) -> str:
        # The chat endpoint applies the served model's template itself.
        return user_message if self.use_chat else self.tok.render(user_message, chat_template)

    def count_prompt(self, prompt: str, chat_template: bool = True) -> int:
        # The chat endpoint wraps the message in the served model's template; counting
        # it with the job's tokenizer's template keeps prompt budgets on the server too.
        # The completions endpoint gets the dataset's prompt as is, as a local run would
        # feed it: rendered with the template or not, as the job asked (chat_template).
        if self.use_chat:
            return self.tok.count_prompt(self.tok.render(prompt))
        return self.tok.count_prompt(prompt, chat_template)

    def prefix_token_text(self) -> str | None:
        return self.tok.prefix_token_text()

    # --- requests ---------------------------------------------------------------------

    def _one(self, request: GenerationRequest) -> Generation:
        started = time.perf_counter()
        body: dict[str, Any] = {"model": self.served_model, "max_tokens": request.max_new_tokens,
                                "temperature": 0}
        if self.use_chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
            try:
                answer, attempts = self.client.post("/chat/completions", body)
            except RemoteApiError as exc:
                # A model without a chat template: vLLM answers 400 naming it,
                # transformers serve a bare 500 (the reason only in its log).
                if exc.status in (400, 422, 500) or "template" in str(exc).lower():
                    raise RemoteApiError(f"{exc}; {NO_CHAT_TEMPLATE_HINT}", exc.status) from None
                raise
            text = (answer["choices"][0].get("message") or {}).get("content") or ""
        else:
            body["prompt"] = request.prompt
            answer, attempts = self.client.post("/completions", body)
            text = answer["choices"][0].get("text") or ""
        usage = answer.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens")
                            or self.count_prompt(request.prompt, request.chat_template))
        output_tokens = int(usage.get("completion_tokens") or len(self.encode(text)))
        with self.stats.lock:
            self.stats.requests += 1
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += output_tokens
        latency = time.perf_counter() - started
        return Generation(text=text.strip(), prompt_tokens=prompt_tokens,
                          output_tokens=output_tokens, latency_s=latency,
                          extra={"api": {"attempts": attempts, "usage": usage,
                                         "latency_s": round(latency, 4)}})

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        _refuse_cuts(requests)
        if len(requests) <= 1 or self.options.concurrency == 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(min(self.options.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def loglikelihood(self, requests: list[LoglikelihoodRequest],
                      batch_size: int = 1) -> list[Loglikelihood]:
        """One completions request per request (`batch_size` changes nothing here)."""
        _refuse_cuts(requests)
        if self.use_chat:
            raise RemoteApiError("log-likelihood needs the completions endpoint with echo and "
                           "logprobs (set api.endpoint to \"completions\"), or use a "
                           "generation method of the dataset (e.g. C-Eval method: generate)")
        if not requests:
            return []
        # The first request alone: an endpoint without prompt log-probabilities is
        # named at once instead of after a batch of failed (or retried) requests.
        first = self._loglikelihood(requests[0], probe=True)
        rest = requests[1:]
        if len(rest) <= 1 or self.options.concurrency == 1:
            return [first, *(self._loglikelihood(r) for r in rest)]
        with ThreadPoolExecutor(min(self.options.concurrency, len(rest))) as pool:
            return [first, *pool.map(self._loglikelihood, rest)]

    def _loglikelihood(self, request: LoglikelihoodRequest, probe: bool = False
                       ) -> Loglikelihood:
        # max_tokens 1, not 0: llama-cpp-python generates until its context is full
        # for 0 and transformers' generate() refuses it; the one generated token is
        # told apart from the echoed prompt and left out.
        context, continuation = move_trailing_whitespace(request.context, request.continuation)
        body = {"model": self.served_model, "prompt": context + continuation,
                "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        try:
            # A 500 to the first echo request is the server refusing echo/logprobs
            # (transformers serve), not a hiccup worth five retries.
            answer, _ = self.client.post("/completions", body,
                                   RETRY_STATUS - {500} if probe else RETRY_STATUS)
        except RemoteApiError as exc:
            if probe and exc.status is not None and exc.status not in (401, 403, 404, 429):
                raise RemoteApiError(f"{NO_PROMPT_LOGPROBS}; {exc}", exc.status) from None
            raise
        return read_prompt_logprobs(answer, context, continuation,
                                    f"{self.options.base_url}/completions")

    # --- placement: HeldModel's defaults (the weights live on the API's side) ----------

    def close(self) -> None:
        self.client.key = None


def _refuse_cuts(requests: list[Any]) -> None:
    """A request that asks for its earliest tokens to be dropped (`keep_last`: longer
    than the context) cannot be cut token by token through a text API: refused, never
    sent whole."""
    cut = next((r for r in requests if getattr(r, "keep_last", None)), None)
    if cut is not None:
        raise ValueError(f"a prompt is longer than the {cut.keep_last} tokens it may take; "
                         "an openai: model is sent text and cannot cut it token by token "
                         "(fewer few-shot examples, or a model with a longer context)")


def read_prompt_logprobs(answer: dict[str, Any], context: str, continuation: str,
                         url: str = "the endpoint") -> Loglikelihood:
    """The continuation's log-likelihood from a completions answer to `context +
    continuation` with echo + logprobs.

    The echoed prompt's tokens are the answer's tokens less the generated ones
    (`usage.completion_tokens`, else those whose text offset lies past the prompt).
    Walking back from the prompt's end, the tokens whose text spells the continuation
    (with the start of the context, if one token spans both, as a local run's split
    does) are summed; when their text does not spell it, or no context token precedes
    them, or the prompt's tokens do not spell the prompt, the answer is refused with
    RemoteApiError rather than read as a guess.
    """
    choice = (answer.get("choices") or [{}])[0]
    logprobs = choice.get("logprobs") or {}
    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if not tokens or not values or len(tokens) != len(values):
        raise RemoteApiError(f"{NO_PROMPT_LOGPROBS}; {url} answered without them, so "
                       "log-likelihood datasets cannot be scored through it (score them "
                       "by generation instead, e.g. C-Eval method: generate)")
    prompt = context + continuation
    tops = logprobs.get("top_logprobs") or [None] * len(values)
    generated = (answer.get("usage") or {}).get("completion_tokens")
    offsets = logprobs.get("text_offset")
    if isinstance(generated, int) and 0 <= generated <= len(tokens):
        n_prompt = len(tokens) - generated
    elif offsets and len(offsets) == len(tokens):
        n_prompt = sum(1 for offset in offsets if offset < len(prompt))
    else:
        n_prompt = len(tokens)
    spelled, first = "", n_prompt
    while first > 0 and len(spelled) < len(continuation):
        first -= 1
        spelled = str(tokens[first]) + spelled
    head = spelled[:len(spelled) - len(continuation)]
    echoed = "".join(str(t) for t in tokens[:n_prompt])
    covered = (spelled.endswith(continuation) and context.endswith(head)
               and (first > 0 or not context)
               # byte pieces of a character come back as U+FFFD: not comparable then
               and ("\ufffd" in echoed or echoed.endswith(prompt)))
    picked = values[first:n_prompt]
    if not covered or any(v is None for v in picked):
        raise RemoteApiError(f"the tokens {url} returned do not cover the prompt: the echoed "
                       f"prompt's last tokens spell {spelled[-60:]!r} where the continuation "
                       f"is {continuation[-60:]!r}; the server must echo the prompt's tokens "
                       "with their log-probabilities (echo + logprobs)")
    greedy = True
    for top, token in zip(tops[first:n_prompt], tokens[first:n_prompt], strict=False):
        if top:
            greedy = greedy and max(top, key=top.get) == token
    return Loglikelihood(float(sum(picked)), greedy, n_prompt - first)


def load_api_runner(name: str, options: ApiOptions, api_key: str | None,
                    settings: Settings) -> OpenAIRunner:
    """An OpenAIRunner for `openai:<served model>`, with its local tokenizer loaded."""
    from transformers import AutoTokenizer

    from backend.runners.hf.loading import model_source
    from backend.runners.hf.tokenizer import HFTokenizer
    from backend.runners.models import model_info, resolve_model

    spec = resolve_model(options.tokenizer or "builtin:tiny", settings)
    tokenizer = AutoTokenizer.from_pretrained(model_source(spec, settings),
                                              local_files_only=not settings.allow_download)
    max_length = options.max_length or model_info(spec).max_length or 4096
    served = name.removeprefix(PREFIX)
    key = key_for(options, api_key, settings)
    log.info("[OpenAI] %s at %s (%s endpoint, %d at a time, prompts in %s tokens)", served,
             mask_url(options.base_url or ""), options.endpoint, options.concurrency, spec.name)
    return OpenAIRunner(name, served, options, key, HFTokenizer(tokenizer, max_length),
                        max_length)
