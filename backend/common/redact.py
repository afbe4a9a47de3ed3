"""Keeping secrets and formulas out of what the product shows or logs.

- `mask_url`: a URL with its password replaced by `***`; `MaskPasswords` applies it
  to every log line (installed by `setup_logging`).
- `csv_cell`: a CSV cell a spreadsheet will not run as a formula.

Remote servers' error text is cleaned by `runners.openai.transport.remote_message`
/ `clean_remote_text`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)[^@/\s]*@")


def mask_url(text: str) -> str:
    """`text` with every URL password replaced by `***` (user and host kept)."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***@", text)


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
