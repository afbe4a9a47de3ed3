"""Keeping secrets and foreign text out of what the product shows or logs.

- `mask_url`: a URL with its password (and a bearer-like user) replaced by `***`;
  `MaskPasswords` applies it to every log line (installed by `setup_logging`).
- `clean_text`: text from outside (a remote server's error message) made safe to
  store and show: control characters dropped, whitespace folded, length capped.
- `remote_reason`: the short reason of a remote HTTP error answer: its JSON
  `error.message` (or `error` / `message` / `detail` text) through `clean_text`,
  never the raw body (an internal service's page must not be copied into a job).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from typing import Any

MAX_REASON = 200

# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)[^@/\s]*@")


def mask_url(text: str) -> str:
    """`text` with every URL password replaced by `***` (user and host kept)."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***@", text)


def clean_text(text: str, limit: int = MAX_REASON) -> str:
    """Control and format characters removed (newlines become spaces), runs of
    whitespace folded to one space, lone surrogates dropped, and at most `limit`
    characters (an ellipsis marks a cut)."""
    kept = []
    for ch in text:
        if ch in "\t\r\n":
            kept.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            continue
        else:
            kept.append(ch)
    folded = " ".join("".join(kept).split())
    return folded if len(folded) <= limit else folded[:limit - 1].rstrip() + "…"


def remote_reason(body: bytes | str | None, limit: int = MAX_REASON) -> str:
    """The reason a remote JSON error answer gives, cleaned; '' when the body is not
    JSON or names none (the raw body is never returned)."""
    if not body:
        return ""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""
    message: Any = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            message = err.get("message")
        elif isinstance(err, str):
            message = err
        if message is None:
            message = data.get("message", data.get("detail"))
    return clean_text(message, limit) if isinstance(message, str) else ""


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet will not run as a formula (OWASP CSV injection):
    text starting with = + - @ tab or CR gets a leading apostrophe. Numbers stay."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


class MaskPasswords(logging.Filter):
    """Masks URL passwords in a log record's message (arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's own business
            return True
        masked = mask_url(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
