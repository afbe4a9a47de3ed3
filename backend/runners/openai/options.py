"""The `api` options of a job for an `openai:` model, and where they may lead.

The server's own key (LBS_OPENAI_API_KEY) goes only to the server's base URL
(LBS_OPENAI_BASE_URL); a job naming another URL sends its own key or none (`key_for`).
A job may name only the hosts the operator allows (`check_host`).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

MAX_TIMEOUT_S = 600.0
"""Longest wait for one answer: a generation of thousands of tokens on a busy server."""
MAX_RETRIES = 10
"""With the backoff (at most 30 s, or Retry-After up to 60 s) a request gives up after
at most about (MAX_RETRIES + 1) x timeout_s + 10 min; cancel and the job's timeout_s
interrupt it within a second whatever these are."""


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


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def allowed_hosts(settings: Any) -> list[str]:
    """What a job's base_url may name: LBS_OPENAI_ALLOWED_HOSTS, the host and port of
    LBS_OPENAI_BASE_URL (not its host's other ports: they are other services), and
    'loopback' while the server has no API token (then only people on this machine
    reach the API, and they reach loopback services anyway)."""
    hosts = list(settings.openai_allowed_hosts)
    if settings.openai_base_url:
        host, port = _host_port(settings.openai_base_url)
        hosts.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
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
    host, port = _host_port(base_url)
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
