"""One request to an OpenAI-compatible server: a POST with retries and backoff that a
job's stop ends within a fraction of a second, and remote error text made safe to keep.

Each request runs on a helper thread while the calling thread waits in short steps,
so cancel, the job's timeout and worker shutdown (`should_stop`) end a request that
hangs: its socket is shut down under it. 429, 5xx, timeouts and unreadable answers are
retried with exponential backoff. Redirects are not followed (they could lead off the
allowed hosts) and environment proxies are not used. The API key travels only in the
Authorization header and never enters a log line or an exception message (`redact`);
a remote error becomes its status code and a short cleaned reason, never the remote
body (`remote_message`).
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from backend.common.redact import mask_secrets, mask_url
from backend.engine.contracts import Stopped
from backend.runners.openai.options import ApiOptions

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_ANSWER_BYTES = 64 * 1024 * 1024
POLL_S = 0.1


class RemoteApiError(RuntimeError):
    """A request that failed for good (after retries, or one that retrying cannot fix);
    `status` is the last HTTP status the server answered, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def remote_message(raw: bytes, limit: int = 300, secrets: tuple[str | None, ...] = ()) -> str:
    """What a remote JSON error answer says (`error.message`, or `error` / `message` /
    `detail` text), safe to store and show (see `clean_remote_text`: `secrets` masked
    before the length is capped). '' for a body that is not such JSON: an HTML page of
    some internal service is never copied into a job.
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
    return clean_remote_text(found, limit, secrets) if isinstance(found, str) else ""


def clean_remote_text(text: str, limit: int = 300,
                      secrets: tuple[str | None, ...] = ()) -> str:
    """Text from a remote server made safe to store and show: `secrets`, URL passwords
    and what looks like a credential (`mask_secrets`) masked first, so a cut never
    leaves part of one; then ANSI sequences and control characters (newlines included)
    removed, whitespace folded, length capped."""
    for secret in secrets:
        text = redact(text, secret)
    text = mask_secrets(text)
    text = " ".join(_CONTROL.sub(" ", _ANSI.sub("", text)).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass
class ApiStats:
    """What a runner's requests cost, summed over its threads."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ApiClient:
    """POSTs to `options.base_url` with the key `key` (None: no Authorization header),
    counting retries in `stats`, and stopping when `should_stop` turns true."""

    def __init__(self, options: ApiOptions, key: str | None, stats: ApiStats,
                 should_stop: Callable[[], bool]):
        self.options = options
        self.key = key
        self.stats = stats
        self.should_stop = should_stop

    def post(self, path: str, body: dict[str, Any],
             retry_status: frozenset[int] | set[int] = RETRY_STATUS
             ) -> tuple[dict[str, Any], int]:
        """POST with retries (on `retry_status`, timeouts and unreadable answers);
        returns (answer, attempts). Raises RemoteApiError, or Stopped when `should_stop`
        turns true while it waits."""
        url = f"{self.options.base_url}{path}"
        shown = mask_url(url)
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
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
                    reason = remote_message(raw, secrets=(self.key,)) \
                        or http.client.responses.get(status, "")
                    problem = f"HTTP {status}" + (f": {reason}" if reason else "")
                    if status not in retry_status:
                        raise RemoteApiError(redact(f"{shown} answered {problem}", self.key),
                                             status)
                    retry_after = answer_headers.get("Retry-After")
            except TimeoutError:
                problem = f"no answer within {self.options.timeout_s:g} s"
            except (http.client.HTTPException, OSError) as err:
                reason = clean_remote_text(str(err) or type(err).__name__,
                                           secrets=(self.key,))
                problem = f"cannot reach {shown}: {reason}"
            problem = redact(problem, self.key)
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
