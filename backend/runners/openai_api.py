"""Models behind an OpenAI-compatible HTTP API (`openai:<served model name>`).

The model runs elsewhere; this runner sends each prompt to `<base_url>/chat/completions`
(the server applies its chat template) or `<base_url>/completions` (the prompt as
is), a bounded number at a time, retrying 429, 5xx, timeouts and unreadable answers
with exponential backoff. Token usage, latency and attempts are kept per request.

Datasets build prompts in a local tokenizer's tokens (`tokenizer`: the model's own
tokenizer folder or cached hub id, else the built-in tiny model's, so NIAH lengths
are then approximate for the remote model). Log-likelihood needs the completions
endpoint to echo the prompt with its token log-probabilities (`echo` + `logprobs`,
as vLLM and the legacy OpenAI completions API do); an endpoint that does not gets a
clear error rather than a guess.

The API key travels only in the Authorization header and never enters a log line,
an exception message or a stored row (see `redact`).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from backend.runners.base import (
    Generation,
    GenerationRequest,
    Loglikelihood,
    LoglikelihoodRequest,
    Runner,
    move_trailing_whitespace,
)

log = logging.getLogger(__name__)

PREFIX = "openai:"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class ApiOptions(BaseModel):
    """The `api` object of a job for an `openai:` model (settings fill what it leaves out)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1")
    api_key: SecretStr | None = Field(None, description="sent as a Bearer token; never stored "
                                                        "in clear nor returned")
    endpoint: Literal["chat", "completions"] = "chat"
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="per request")
    max_retries: int = Field(4, ge=0, le=20, description="on 429, 5xx, timeouts, bad JSON")
    tokenizer: str | None = Field(None, description="local tokenizer for prompt building "
                                                    "(default: the built-in tiny model's)")
    max_length: int | None = Field(None, ge=16, description="the served model's context "
                                                            "(default: the tokenizer's)")

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    def public(self) -> dict[str, Any]:
        """What may be stored in clear and shown: everything but the key."""
        return self.model_dump(mode="json", exclude={"api_key"}, exclude_none=True)


class ApiError(RuntimeError):
    """A request that failed for good (after retries, or one that retrying cannot fix)."""


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


@dataclass
class _Stats:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class OpenAIRunner(Runner):
    """A served model. `tokenizer` is a PromptTokenizer-like object (HFTokenizer)."""

    device = "remote"

    def __init__(self, name: str, served_model: str, options: ApiOptions, api_key: str | None,
                 tokenizer: Any, max_length: int):
        self.name = name
        self.served_model = served_model
        self.options = options
        self._key = api_key
        self.tok = tokenizer
        self.max_length = max_length
        self.stats = _Stats()
        self.use_chat = options.endpoint == "chat"

    # --- PromptTokenizer ----------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def render(self, user_message: str) -> str:
        # The chat endpoint applies the served model's template itself.
        return user_message if self.use_chat else self.tok.render(user_message)

    def count_prompt(self, prompt: str) -> int:
        return self.tok.count_prompt(prompt)

    def without_chat_template(self) -> OpenAIRunner:
        return self  # the chat endpoint always templates; completions never does here

    # --- HTTP -----------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """POST with retries; returns (answer, attempts). Raises ApiError."""
        url = f"{self.options.base_url}{path}"
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        attempts = 0
        while True:
            attempts += 1
            problem, retry_after = None, None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.options.timeout_s) as res:
                    raw = res.read()
                try:
                    answer = json.loads(raw)
                    if not isinstance(answer, dict) or not answer.get("choices"):
                        raise ValueError("no choices")
                    return answer, attempts
                except ValueError:
                    problem = f"unreadable answer ({raw[:80]!r})"
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace")
                if err.code not in RETRY_STATUS:
                    raise ApiError(redact(f"{url} answered HTTP {err.code}: {detail}",
                                          self._key)) from None
                problem = f"HTTP {err.code}"
                retry_after = err.headers.get("Retry-After") if err.headers else None
            except TimeoutError:
                problem = f"no answer within {self.options.timeout_s:g} s"
            except urllib.error.URLError as err:
                if isinstance(err.reason, TimeoutError):
                    problem = f"no answer within {self.options.timeout_s:g} s"
                else:
                    problem = f"cannot reach {url}: {err.reason}"
            except (ConnectionError, OSError) as err:
                problem = f"connection failed: {err}"
            problem = redact(problem, self._key)
            if attempts > self.options.max_retries:
                raise ApiError(f"{url}: {problem} (gave up after {attempts} attempts)")
            delay = min(30.0, 0.25 * 2 ** (attempts - 1)) * (0.5 + random.random() / 2)
            if retry_after:
                try:
                    delay = min(60.0, float(retry_after))
                except ValueError:
                    pass
            with self.stats.lock:
                self.stats.retries += 1
            log.warning("[OpenAI] %s; retry %d of %d in %.2f s", problem, attempts,
                        self.options.max_retries, delay)
            time.sleep(delay)

    def _one(self, request: GenerationRequest) -> Generation:
        started = time.perf_counter()
        body: dict[str, Any] = {"model": self.served_model, "max_tokens": request.max_new_tokens,
                                "temperature": 0}
        if self.use_chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
            answer, attempts = self._post("/chat/completions", body)
            text = (answer["choices"][0].get("message") or {}).get("content") or ""
        else:
            body["prompt"] = request.prompt
            answer, attempts = self._post("/completions", body)
            text = answer["choices"][0].get("text") or ""
        usage = answer.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or self.count_prompt(request.prompt))
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
        if len(requests) <= 1 or self.options.concurrency == 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(min(self.options.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def loglikelihood(self, requests: list[LoglikelihoodRequest],
                      batch_size: int = 1) -> list[Loglikelihood]:
        """One completions request per request (`batch_size` changes nothing here)."""
        if self.use_chat:
            raise ApiError("log-likelihood needs the completions endpoint with echo and "
                           "logprobs (set api.endpoint to \"completions\"), or use a "
                           "generation method of the dataset (e.g. C-Eval method: generate)")
        return [self._loglikelihood(r) for r in requests]

    def _loglikelihood(self, request: LoglikelihoodRequest) -> Loglikelihood:
        context, continuation = move_trailing_whitespace(request.context, request.continuation)
        body = {"model": self.served_model, "prompt": context + continuation, "max_tokens": 0,
                "echo": True, "logprobs": 1, "temperature": 0}
        answer, _ = self._post("/completions", body)
        logprobs = answer["choices"][0].get("logprobs") or {}
        offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
        if not offsets or not values:
            raise ApiError("the endpoint did not return prompt log-probabilities (echo + "
                           "logprobs); log-likelihood datasets cannot be scored through it")
        tops = logprobs.get("top_logprobs") or [None] * len(values)
        tokens = logprobs.get("tokens") or [None] * len(values)
        total, greedy, count = 0.0, True, 0
        for offset, value, top, token in zip(offsets, values, tops, tokens, strict=False):
            if offset < len(context) or value is None:
                continue
            total += float(value)
            count += 1
            if top and token is not None:
                greedy = greedy and max(top, key=top.get) == token
        if count == 0:
            raise ApiError("the continuation has no tokens in the endpoint's answer")
        return Loglikelihood(total, greedy, count)

    # --- placement (the model manager) ------------------------------------------------

    def size_bytes(self) -> int:
        return 0

    def host_bytes(self) -> int:
        return 0

    def movable(self) -> bool:
        return False  # nothing to move: the weights live on the API's side

    def offload(self, pin: bool) -> int:
        return 0

    def restore(self, device: str = "cuda:0") -> int:
        return 0

    def close(self) -> None:
        self._key = None


def effective_options(options: ApiOptions | None, settings: Any) -> ApiOptions:
    """The job's options with the settings' base URL filled in; raises ValueError if
    there is no base URL at all."""
    options = options or ApiOptions()
    if options.base_url is None:
        if not settings.openai_base_url:
            raise ValueError("no base URL: give api.base_url in the job or set "
                             "LBS_OPENAI_BASE_URL")
        options = options.model_copy(update={"base_url": settings.openai_base_url.rstrip("/")})
    return options


def load_api_runner(name: str, options: ApiOptions, api_key: str | None,
                    settings: Any) -> OpenAIRunner:
    """An OpenAIRunner for `openai:<served model>`, with its local tokenizer loaded."""
    from transformers import AutoTokenizer

    from backend.runners.hf import HFTokenizer, model_source
    from backend.runners.models import model_info, resolve_model

    spec = resolve_model(options.tokenizer or "builtin:tiny", settings)
    tokenizer = AutoTokenizer.from_pretrained(model_source(spec, settings),
                                              local_files_only=not settings.allow_download)
    max_length = options.max_length or model_info(spec).max_length or 4096
    served = name.removeprefix(PREFIX)
    key = api_key or settings.openai_api_key or None
    log.info("[OpenAI] %s at %s (%s endpoint, %d at a time, prompts in %s tokens)", served,
             options.base_url, options.endpoint, options.concurrency, spec.name)
    return OpenAIRunner(name, served, options, key, HFTokenizer(tokenizer, max_length),
                        max_length)
