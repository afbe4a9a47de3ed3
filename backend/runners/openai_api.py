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

The API key travels only in the Authorization header and never enters a log line,
an exception message or a stored row (see `redact`). The server's own key
(LBS_OPENAI_API_KEY) goes only to the server's base URL (LBS_OPENAI_BASE_URL); a job
naming another URL sends its own key or none (`key_for`). A job may name only the
hosts the operator allows (`check_host`). A remote error becomes its status code
and a short cleaned reason, never the remote body (`remote_message`).

Each request runs on a helper thread while the calling thread waits in short steps,
so cancel, the job's timeout and worker shutdown (`should_stop`) end a request that
hangs within a fraction of a second: its socket is shut down under it. Redirects are
not followed (they could lead off the allowed hosts) and environment proxies are not
used.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from backend.common.redact import mask_url
from backend.engine.contracts import (
    Generation,
    GenerationRequest,
    JobFieldError,
    JobFieldRefused,
    Loglikelihood,
    LoglikelihoodRequest,
    ModelSpec,
    Stopped,
    move_trailing_whitespace,
)
from backend.runners.base import Runner

log = logging.getLogger(__name__)

PREFIX = "openai:"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_TIMEOUT_S = 600.0
"""Longest wait for one answer: a generation of thousands of tokens on a busy server."""
MAX_RETRIES = 10
"""With the backoff (at most 30 s, or Retry-After up to 60 s) a request gives up after
at most about (MAX_RETRIES + 1) x timeout_s + 10 min; cancel and the job's timeout_s
interrupt it within a second whatever these are."""
MAX_ANSWER_BYTES = 64 * 1024 * 1024
POLL_S = 0.1


class ApiOptions(BaseModel):
    """The `api` object of a job for an `openai:` model (settings fill what it leaves out)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    base_url: str | None = Field(None, max_length=2048,
                                 description="e.g. http://127.0.0.1:8000/v1")
    api_key: SecretStr | None = Field(None, max_length=4096,
                                      description="sent as a Bearer token; never stored "
                                                  "in clear nor returned")
    endpoint: Literal["chat", "completions"] = "chat"
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, le=MAX_TIMEOUT_S,
                             description="per request (the answer included)")
    max_retries: int = Field(4, ge=0, le=MAX_RETRIES,
                             description="on 429, 5xx, timeouts, bad JSON")
    tokenizer: str | None = Field(None, max_length=1024,
                                  description="local tokenizer for prompt building "
                                              "(default: the built-in tiny model's)")
    max_length: int | None = Field(None, ge=16, description="the served model's context "
                                                            "(default: the tokenizer's)")

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if value is not None:
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                raise ValueError("is not a valid URL") from None
            if not parts.hostname or any(ord(c) < 33 or c == "\x7f" for c in value):
                raise ValueError("needs a host name and no spaces or control characters")
        return value.rstrip("/") if value else value

    def public(self) -> dict[str, Any]:
        """What may be stored in clear and shown: everything but the key."""
        return self.model_dump(mode="json", exclude={"api_key"}, exclude_none=True)


class RemoteApiError(RuntimeError):
    """A request that failed for good (after retries, or one that retrying cannot fix);
    `status` is the last HTTP status the server answered, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


NO_PROMPT_LOGPROBS = (
    "this endpoint must return prompt log-probabilities for log-likelihood scoring (the "
    "completions endpoint with echo + logprobs, as vLLM and llama.cpp's server do)")
NO_CHAT_TEMPLATE_HINT = (
    "if the served model has no chat template, set api.endpoint \"completions\" (the "
    "prompt is then sent as is)")


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _never() -> bool:
    return False


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def remote_message(raw: bytes, limit: int = 300) -> str:
    """What a remote JSON error answer says (`error.message`, or `error` / `message` /
    `detail` text), safe to store and show: ANSI sequences and control characters
    (newlines included) removed, whitespace folded, length capped. '' for a body that
    is not such JSON: an HTML page of some internal service is never copied into a job.
    """
    try:
        data = json.loads(raw[:65536].decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return ""
    found: Any = None
    if isinstance(data, dict):
        err = data.get("error")
        found = err.get("message") if isinstance(err, dict) else err
        if not isinstance(found, str):
            found = data.get("message", data.get("detail"))
    return clean_remote_text(found, limit) if isinstance(found, str) else ""


def clean_remote_text(text: str, limit: int = 300) -> str:
    """Text from a remote server made safe to store and show: ANSI sequences and
    control characters (newlines included) removed, whitespace folded, length capped."""
    text = " ".join(_CONTROL.sub(" ", _ANSI.sub("", text)).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass
class _Stats:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class OpenAIRunner(Runner):
    """A served model. `tokenizer` is a PromptTokenizer-like object (HFTokenizer).

    It holds no weights here: the memory reporting is HeldModel's (0 bytes, nothing
    to move), and admission admits its jobs anywhere (no GPU memory needed)."""

    scheme = "openai"
    device = "remote"

    # --- class side (the runner registry; no torch) ------------------------------------

    @classmethod
    def resolve(cls, reference: str, settings: Any, confine: bool = True) -> ModelSpec:
        from backend.engine.contracts import ModelNotFound

        served = reference.split(":", 1)[1].strip()
        if not served:
            raise ModelNotFound("give the served model's name after openai:, e.g. openai:gpt-4o")
        return ModelSpec(name=reference, path=None, runner=cls.scheme, target=served)

    @classmethod
    def check_job(cls, job: Any, settings: Any, confine: bool = True) -> None:
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
        if job.api_key is None and api.api_key is not None:
            job.api_key = api.api_key.get_secret_value()
        job.api = api

    @classmethod
    def model_info(cls, job: Any) -> Any:
        from backend.engine.contracts import ModelInfo

        # known once the runner (its tokenizer) is made, unless the job says
        return ModelInfo(job.spec.name, job.api.max_length)

    @classmethod
    def cache_key(cls, job: Any, settings: Any, method: str | None) -> tuple:
        """Its options, and a digest of its key (never the key)."""
        import hashlib

        digest = hashlib.sha256((job.api_key or "").encode()).hexdigest()[:16]
        return (job.spec.name, "openai", json.dumps(job.api.public(), sort_keys=True), digest)

    @classmethod
    def loader(cls, job: Any, settings: Any, method: str | None
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
        self._key = api_key
        self.tok = tokenizer
        self.max_length = max_length
        self.stats = _Stats()
        self.use_chat = options.endpoint == "chat"
        self.should_stop: Callable[[], bool] = _never
        """Set per job by the evaluation loop: true once the job is cancelled, timed
        out or its worker stops; waiting requests then raise `Stopped`."""

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

    # --- HTTP -----------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any],
              retry_status: frozenset[int] | set[int] = RETRY_STATUS
              ) -> tuple[dict[str, Any], int]:
        """POST with retries (on `retry_status`, timeouts and unreadable answers);
        returns (answer, attempts). Raises RemoteApiError, or Stopped when `should_stop`
        turns true while it waits."""
        url = f"{self.options.base_url}{path}"
        shown = mask_url(url)
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        attempts, status = 0, None
        while True:
            attempts += 1
            problem, retry_after, status = None, None, None
            try:
                status, answer_headers, raw = self._exchange(url, data, headers)
                if 200 <= status < 300:
                    try:
                        answer = json.loads(raw)
                        if not isinstance(answer, dict) or not answer.get("choices"):
                            raise ValueError("no choices")
                        return answer, attempts
                    except (ValueError, RecursionError):
                        problem = "unreadable answer (not the JSON of a completion)"
                else:
                    # the JSON error's message, else the status line's reason phrase
                    reason = remote_message(raw) or http.client.responses.get(status, "")
                    problem = f"HTTP {status}" + (f": {reason}" if reason else "")
                    if status not in retry_status:
                        raise RemoteApiError(redact(f"{shown} answered {problem}", self._key),
                                       status)
                    retry_after = answer_headers.get("Retry-After")
            except TimeoutError:
                problem = f"no answer within {self.options.timeout_s:g} s"
            except (http.client.HTTPException, OSError) as err:
                reason = clean_remote_text(str(err) or type(err).__name__)
                problem = f"cannot reach {shown}: {reason}"
            problem = redact(problem, self._key)
            if attempts > self.options.max_retries:
                raise RemoteApiError(f"{shown}: {problem} (gave up after {attempts} attempts)",
                               status)
            delay = min(30.0, 0.25 * 2 ** (attempts - 1)) * (0.5 + random.random() / 2)
            if retry_after:
                try:
                    delay = min(60.0, max(0.0, float(retry_after)))
                except ValueError:
                    pass
            with self.stats.lock:
                self.stats.retries += 1
            log.warning("[OpenAI] %s; retry %d of %d in %.2f s", problem, attempts,
                        self.options.max_retries, delay)
            self._sleep(delay)

    def _sleep(self, seconds: float) -> None:
        """time.sleep that ends early (raising Stopped) when the job should stop."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if self.should_stop():
                raise Stopped("the job was cancelled, timed out or its worker is stopping")
            time.sleep(min(POLL_S, left))

    def _exchange(self, url: str, data: bytes, headers: dict[str, str]
                  ) -> tuple[int, Any, bytes]:
        """One POST: (status, headers, body). The request runs on a helper thread;
        this thread waits in POLL_S steps and, when the job should stop or timeout_s
        passed, shuts the socket down under the helper (Stopped / TimeoutError)."""
        parts = urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" \
            else http.client.HTTPConnection
        conn = kind(parts.hostname, parts.port, timeout=self.options.timeout_s)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        box: dict[str, Any] = {}
        done = threading.Event()

        def send() -> None:
            try:
                conn.request("POST", target or "/", body=data, headers=headers)
                res = conn.getresponse()
                raw = res.read(MAX_ANSWER_BYTES + 1)
                if len(raw) > MAX_ANSWER_BYTES:
                    raise http.client.HTTPException(
                        f"answer larger than {MAX_ANSWER_BYTES // 2**20} MB")
                box["answer"] = (res.status, res.headers, raw)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=send, name="openai-request", daemon=True).start()
        deadline = time.monotonic() + self.options.timeout_s
        try:
            while not done.wait(POLL_S):
                if self.should_stop():
                    raise Stopped("the job was cancelled, timed out or its worker is stopping")
                if time.monotonic() > deadline:
                    raise TimeoutError
        finally:
            if not done.is_set():
                _abort(conn)
            else:
                conn.close()
        if "error" in box:
            error = box["error"]
            if isinstance(error, socket.timeout):
                raise TimeoutError from None
            raise error
        return box["answer"]

    def _one(self, request: GenerationRequest) -> Generation:
        started = time.perf_counter()
        body: dict[str, Any] = {"model": self.served_model, "max_tokens": request.max_new_tokens,
                                "temperature": 0}
        if self.use_chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
            try:
                answer, attempts = self._post("/chat/completions", body)
            except RemoteApiError as exc:
                # A model without a chat template: vLLM answers 400 naming it,
                # transformers serve a bare 500 (the reason only in its log).
                if exc.status in (400, 422, 500) or "template" in str(exc).lower():
                    raise RemoteApiError(f"{exc}; {NO_CHAT_TEMPLATE_HINT}", exc.status) from None
                raise
            text = (answer["choices"][0].get("message") or {}).get("content") or ""
        else:
            body["prompt"] = request.prompt
            answer, attempts = self._post("/completions", body)
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
        if len(requests) <= 1 or self.options.concurrency == 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(min(self.options.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def loglikelihood(self, requests: list[LoglikelihoodRequest],
                      batch_size: int = 1) -> list[Loglikelihood]:
        """One completions request per request (`batch_size` changes nothing here)."""
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
            answer, _ = self._post("/completions", body,
                                   RETRY_STATUS - {500} if probe else RETRY_STATUS)
        except RemoteApiError as exc:
            if probe and exc.status is not None and exc.status not in (401, 403, 404, 429):
                raise RemoteApiError(f"{NO_PROMPT_LOGPROBS}; {exc}", exc.status) from None
            raise
        return read_prompt_logprobs(answer, context, continuation,
                                    f"{self.options.base_url}/completions")

    # --- placement: HeldModel's defaults (the weights live on the API's side) ----------

    def close(self) -> None:
        self._key = None


def _abort(conn: http.client.HTTPConnection) -> None:
    """End a request that is still waiting: shut its socket down (the helper thread's
    read returns at once) and close it."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    conn.close()


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


def effective_options(options: ApiOptions | None, settings: Any) -> ApiOptions:
    """The job's options with the settings' base URL filled in; raises ValueError if
    there is no base URL at all, or HostNotAllowed (a ValueError) if the job names a
    host the operator does not allow (see `check_host`)."""
    options = options or ApiOptions()
    if options.base_url is None:
        if not settings.openai_base_url:
            raise ValueError("no base URL: give api.base_url in the job or set "
                             "LBS_OPENAI_BASE_URL")
        options = options.model_copy(update={"base_url": settings.openai_base_url.rstrip("/")})
    check_host(options.base_url, settings)
    return options


class HostNotAllowed(ValueError):
    """A job's base_url names a host that LBS_OPENAI_ALLOWED_HOSTS does not list."""


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(settings: Any) -> list[str]:
    """What a job's base_url may name: LBS_OPENAI_ALLOWED_HOSTS, the host of
    LBS_OPENAI_BASE_URL, and 'loopback' while the server has no API token (then only
    people on this machine reach the API, and they reach loopback services anyway)."""
    hosts = list(settings.openai_allowed_hosts)
    if settings.openai_base_url:
        hosts.append((urlsplit(settings.openai_base_url).hostname or "").lower())
    if not settings.api_token:
        hosts.append("loopback")
    return hosts


def _split_host(entry: str) -> tuple[str, int | None]:
    """'h' / 'h:80' / '[::1]:80' / '::1' -> (host, port or None)."""
    if entry.startswith("["):
        name, _, rest = entry[1:].partition("]")
        return name, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        return name, int(port)
    return entry, None


def check_host(base_url: str, settings: Any) -> None:
    """Raise HostNotAllowed unless `base_url`'s host (or host:port) is allowed. Names
    are compared as written (no DNS look-up), so an allowed name is the operator's
    promise about where it leads."""
    if base_url.rstrip("/") == settings.openai_base_url.rstrip("/"):
        return
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    allowed = allowed_hosts(settings)
    for entry in allowed:
        if entry == "*" or (entry == "loopback" and _is_loopback(host)):
            return
        name, entry_port = _split_host(entry)
        if name == host and entry_port in (None, port):
            return
    shown = [h for h in allowed if h != "loopback"] + \
        (["loopback addresses"] if "loopback" in allowed else [])
    raise HostNotAllowed(
        f"host {host!r} is not one this server lets jobs reach (allowed: "
        f"{', '.join(shown) or 'none'}); the operator lists hosts in "
        "LBS_OPENAI_ALLOWED_HOSTS")


def key_for(options: ApiOptions, job_key: str | None, settings: Any) -> str | None:
    """The key to send: the job's own, else the server's LBS_OPENAI_API_KEY, but the
    server's only when the job talks to LBS_OPENAI_BASE_URL itself."""
    if job_key:
        return job_key
    if settings.openai_base_url and options.base_url and \
            options.base_url.rstrip("/") == settings.openai_base_url.rstrip("/"):
        return settings.openai_api_key or None
    return None


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
    key = key_for(options, api_key, settings)
    log.info("[OpenAI] %s at %s (%s endpoint, %d at a time, prompts in %s tokens)", served,
             mask_url(options.base_url or ""), options.endpoint, options.concurrency, spec.name)
    return OpenAIRunner(name, served, options, key, HFTokenizer(tokenizer, max_length),
                        max_length)
