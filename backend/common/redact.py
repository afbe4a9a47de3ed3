"""Keeping secrets and formulas out of what the product shows or logs.

- `mask_url`: a URL with its password replaced by `***`; `MaskPasswords` applies it
  to every log line (installed by `setup_logging`).
- `mask_secrets`: also `password=`, `token:`, Bearer and `sk-` values in free text.
- `csv_cell`: a CSV cell a spreadsheet will not run as a formula.

Remote servers' error text is cleaned by `runners.openai.transport.remote_message`
/ `clean_remote_text`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# scheme://user:password@host -> scheme://user:***@host. The password runs to the
# first '@', '/' included, as SQLAlchemy reads it (`u:pa/ss@host` has password 'pa/ss').
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)[^@\s]*@")
# ...?password=secret / &passwd=secret (libpq and SQLAlchemy take it as a parameter too)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd)=)[^&;#\s]*",
                             re.IGNORECASE)


def mask_url(text: str) -> str:
    """`text` with every URL password (`user:password@`, `?password=`) replaced by
    `***`; user, host and the other parameters kept."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m.group('head')}***", text)


# password=x, "token": "x", Authorization: Bearer x, sk-... keys: in free text a remote
# server wrote (its error message), whatever follows such a word is taken as a secret
_SECRET_WORDS = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd|secret|token|api[_-]?key|authorization)\b"
    r"[\"']?\s*[:=]\s*[\"']?(?:bearer\s+|basic\s+)?)[^\s\"',;&]+"
    r"|(?P<bearer>\bbearer\s+)[^\s\"',;&]+|\bsk-[A-Za-z0-9_-]{6,}", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """`text` (a remote server's error message) with URL passwords, `password=` /
    `token:` / `api_key` values, Bearer tokens and `sk-` keys replaced by `***`."""
    return _SECRET_WORDS.sub(
        lambda m: f"{m.group('head') or m.group('bearer') or ''}***", mask_url(text))


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
