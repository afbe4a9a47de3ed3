"""Checks every request's input before a view sees it: JSON bodies nested at most
MAX_DEPTH deep, and strings (query values, body keys and values) that are valid
Unicode without NUL characters and at most MAX_STRING characters long. What fails
is a 400/422 naming the field, instead of an error deep inside (a recursion limit,
a file system call, the database driver) that would answer 500."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, g, request

from backend.apps.api.errors import ApiError, field_path

MAX_DEPTH = 32
MAX_STRING = 64 * 1024


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (a lone surrogate such as \\ud800 is not)"
    if len(text) > MAX_STRING:
        return f"is longer than {MAX_STRING} characters"
    return None


def _walk(value: Any, loc: tuple[Any, ...]) -> None:
    if len(loc) > MAX_DEPTH:
        raise ApiError(400, "too_deep", f"{field_path(loc)}: JSON nested deeper than "
                       f"{MAX_DEPTH} levels", [{"field": field_path(loc),
                                                "message": f"nested deeper than {MAX_DEPTH}"}])
    if isinstance(value, str):
        problem = _string_problem(value)
        if problem:
            raise ApiError(422, "invalid_text", f"{field_path(loc)}: {problem}",
                           [{"field": field_path(loc), "message": problem}])
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = _string_problem(key)
            if problem:
                shown = field_path(loc)
                raise ApiError(422, "invalid_text", f"{shown}: a key {problem}",
                               [{"field": shown, "message": f"a key {problem}"}])
            _walk(item, (*loc, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, (*loc, i))


def parsed_body() -> Any:
    """The request's JSON body, checked (None when there is none)."""
    return g.get("lbs_body")


def init_app(app: Flask) -> None:
    @app.before_request
    def _check_input():
        for key, value in request.args.items(multi=True):
            for text, what in ((key, "name"), (value, "value")):
                problem = _string_problem(text)
                if problem:
                    name = key if what == "value" and not _string_problem(key) else "query"
                    raise ApiError(422, "invalid_text", f"{name}: the {what} {problem}",
                                   [{"field": name, "message": f"the {what} {problem}"}])
        if request.mimetype != "application/json" or not request.content_length:
            return
        try:
            body = json.loads(request.get_data())
        except RecursionError:
            raise ApiError(400, "too_deep", f"the JSON body is nested deeper than "
                           f"{MAX_DEPTH} levels",
                           [{"field": "body", "message": "nested too deeply"}]) from None
        except ValueError as exc:  # includes UnicodeDecodeError
            raise ApiError(400, "invalid_body", f"the body is not valid JSON: {exc}"[:300],
                           [{"field": "body", "message": "not valid JSON"}]) from None
        _walk(body, ())
        g.lbs_body = body
