"""A few lines of HTTP to a running LLM Bench Shower server's API, for the tools that
drive one from outside (the MCP server, clear_gpu_memory.py). Standard library only:
no model, no torch.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class ServerError(Exception):
    """The server answered with an error (`status`, its error `code` and `message`, and
    the `details` naming fields), or did not answer like an LLM Bench Shower server
    (`status` None; `code` no_server or not_lbs)."""

    def __init__(self, status: int | None, code: str, message: str,
                 details: tuple[str, ...] = ()):
        text = message if status is None else f"HTTP {status} {code}: {message}"
        if details:
            text += f" [{'; '.join(details)}]"
        super().__init__(text)
        self.status, self.code, self.message, self.details = status, code, message, details


class ApiClient:
    """`call` returns the `data` of the server's answer or raises ServerError. A 401
    answer to a client without a token adds `token_hint` to the message."""

    def __init__(self, base_url: str, token: str = "", timeout: float = 60.0,
                 token_hint: str = "set LBS_API_TOKEN to the server's token"):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.token_hint = token_hint

    def call(self, method: str, path: str, body: Any = None,
             timeout: float | None = None) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as res:
                return json.loads(res.read() or b"null")["data"]
        except urllib.error.HTTPError as err:
            raise self._error(err) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(None, "no_server",
                              f"no server answers at {self.base_url} ({reason})") from None
        except (ValueError, KeyError, TypeError):
            raise ServerError(None, "not_lbs", f"{self.base_url} did not answer like an "
                                               "LLM Bench Shower server") from None

    def _error(self, err: urllib.error.HTTPError) -> ServerError:
        """The server's error answer: code, message and the field details it adds."""
        try:
            error = json.loads(err.read())["error"]
            code, message = error["code"], error["message"]
            details = tuple(f"{d['field']}: {d['message']}" for d in error.get("details") or []
                            if d.get("field") and d["message"] not in message)
        except (ValueError, KeyError, TypeError):
            code, message, details = "http_error", str(err.reason), ()
        if err.code == 401 and not self.token:
            message += f" ({self.token_hint})"
        return ServerError(err.code, code, message, details)
