"""The API's error envelope, and the handlers that make every failure one.

Every error answers `{"status": "error", "error": {"code", "message",
"details": [{"field", "message"}]}}` with a 4xx for what the caller got wrong,
507 / 503 with a sentence when the disk is full or the database unavailable
(`storage_problem`), and a bare 500 message (never a stack trace) for the rest.
"""

from __future__ import annotations

import errno
import logging
import re
from typing import Any

from flask import Flask, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error to send to the caller as it is."""

    def __init__(self, status: int, code: str, message: str,
                 details: list[dict[str, str]] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.extra = extra or {}
        """More keys of the error object (a missing dataset's `guidance`)."""


def error_response(status: int, code: str, message: str,
                   details: list[dict[str, str]] | None = None,
                   extra: dict[str, Any] | None = None):
    body = {"status": "error",
            "error": {"code": code, "message": message, "details": details or [],
                      **(extra or {})}}
    return jsonify(body), status


def field_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    """('jobs', 0, 'params', 'x') -> 'jobs[0].params.x'."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


_UNION_TAG = re.compile(r"^(?:[A-Z]\w*|int|float|str|bool|bytes|none|constrained-\w+|"
                        r"[\w-]+\[.*\])$")
"""What pydantic adds to an error's location for each member of a union
(`constrained-int`, `literal['auto']`, `list[int]`, `function-after[...]`, a model's
class name): it means nothing to a user, who named the field only."""


def _plain_message(err: Any) -> str:
    """The error's message as its validator wrote it: pydantic puts "Value error, " or
    "Assertion failed, " before the text of an exception a validator raised."""
    raised = (err.get("ctx") or {}).get("error")
    if err["type"] in ("value_error", "assertion_error") and raised is not None:
        return str(raised)
    return err["msg"]


def validation_details(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """One detail per field the caller got wrong, named as the caller wrote it. The
    errors of a union's members on one field (`1..256` or `"auto"`) become one message
    listing what the field takes: "Input should be less than or equal to 256, or be
    'auto'"."""
    merged: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
        merged.setdefault(field_path(loc, prefix), []).append(_plain_message(err))
    details = []
    for field, messages in merged.items():
        first, *others = dict.fromkeys(messages)  # in order, each once
        alternatives = [m.removeprefix("Input should be ") for m in others]
        message = ", or be ".join([first, *alternatives]) if alternatives else first
        details.append({"field": field, "message": message})
    return details


_SQLITE_FULL = 13
_SQLITE_UNAVAILABLE = {5: "the database is busy", 6: "the database is locked",
                       8: "the database is read-only", 10: "the disk reported an I/O error",
                       14: "the database file cannot be opened"}
"""SQLite's primary result codes (sqlite3 errors' `sqlite_errorcode & 0xff`) that mean
the storage, not the request, is at fault."""


def storage_problem(exc: BaseException) -> tuple[int, str] | None:
    """(507, sentence) when the disk or the database is full, (503, sentence) when the
    database cannot be reached or written for now, None for any other error. Every
    request that changes something is one transaction, so in both cases nothing was
    changed."""
    from sqlalchemy.exc import DBAPIError

    full = (507, "the database has no room left (disk full); nothing was changed. Free "
                 "space on the disk that holds the database and try again")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return full
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        if code & 0xFF == _SQLITE_FULL:
            return full
        reason = _SQLITE_UNAVAILABLE.get(code & 0xFF)
    else:  # PostgreSQL (psycopg): SQLSTATE 53100 disk_full, 08xxx the connection
        state = getattr(orig, "sqlstate", None) or ""
        if state == "53100":
            return full
        reason = ("the database server is out of resources" if state.startswith("53") else
                  "the database server cannot be reached"
                  if state.startswith(("08", "57P")) or (not state and exc.connection_invalidated)
                  else None)
    if reason is None:
        return None
    return 503, f"{reason}; nothing was changed. Try again in a moment"


def init_app(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.extra)

    from backend.queue.jobs import JobConflict, TooManyQueued
    from backend.queue.reads import JobNotFound

    @app.errorhandler(JobNotFound)
    def _not_found(exc: JobNotFound):
        return error_response(404, "not_found", str(exc))

    @app.errorhandler(JobConflict)
    def _conflict(exc: JobConflict):
        return error_response(409, "conflict", str(exc))

    @app.errorhandler(TooManyQueued)
    def _too_many(exc: TooManyQueued):
        return error_response(429, "too_many_queued", str(exc),
                              [{"field": "submitter", "message": str(exc)}])

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError):
        details = validation_details(exc)
        return error_response(422, "validation_error",
                              "; ".join(f"{d['field']}: {d['message']}" for d in details),
                              details)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        problem = storage_problem(exc)
        if problem is not None:
            status, message = problem
            log.error("[API] %s: %s", message, getattr(exc, "orig", None) or exc)
            body, status = error_response(
                status, "insufficient_storage" if status == 507 else "unavailable", message)
            return body, status, {"Retry-After": "30"}
        log.exception("[API] unexpected error")
        return error_response(500, "internal_error",
                              "internal error; the server log has the details")
