"""/openapi.json, generated from the app's routes and the pydantic models they use.

Each view says what it takes and answers with `@documented(...)` beside its route:
a summary, its query model, its body model(s), the `data` of its success answer
(pydantic models or JSON schemas), and the error statuses it may give. The document
walks `app.url_map`, so every route is in it with its path parameters read from the
route's converters, and nothing is in it that no route serves; views that are not
part of the API (the web page) say so with `@undocumented`. A view with neither is
left out and logged, and tests/test_api.py fails on it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Blueprint, Flask, current_app
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from werkzeug.routing import Rule
from werkzeug.routing.converters import NumberConverter

from backend.apps.api.schemas import ErrorResponse
from backend.datasets.registry import dataset_names, get_dataset

log = logging.getLogger(__name__)
bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
View = TypeVar("View", bound=Callable[..., Any])
Schema = type[BaseModel] | list | dict[str, Any]
"""A model (a $ref to it), [model] (an array of it), or a JSON schema as it is."""


@dataclass(frozen=True)
class Operation:
    """What one view takes and answers, for the document."""

    summary: str
    query: type[BaseModel] | None = None
    body: tuple[type[BaseModel], ...] = ()
    """One model, or several: the body is one of them."""
    body_required: bool = True
    data: dict[str, Schema] = field(default_factory=dict)
    """The properties of `data` in the success answer."""
    status: int = 200
    errors: tuple[int, ...] = ()
    also: dict[int, str] = field(default_factory=dict)
    """Other success statuses with the same shape (status -> description)."""
    responses: dict[str, Any] | None = None
    """The whole `responses` object, for an answer that is not the JSON envelope."""


_OPERATIONS: dict[View, Operation | str] = {}
"""Each view's description, or the reason it is left out (`undocumented`)."""


def documented(summary: str, *, query: type[BaseModel] | None = None,
               body: type[BaseModel] | tuple[type[BaseModel], ...] = (),
               body_required: bool = True, data: dict[str, Schema] | None = None,
               status: int = 200, errors: tuple[int, ...] = (),
               also: dict[int, str] | None = None,
               responses: dict[str, Any] | None = None) -> Callable[[View], View]:
    """Describe a view in /openapi.json (put it under the route decorator)."""
    op = Operation(summary, query, body if isinstance(body, tuple) else (body,),
                   body_required, data or {}, status, errors, also or {}, responses)

    def mark(view: View) -> View:
        _OPERATIONS[view] = op
        return view
    return mark


def undocumented(reason: str) -> Callable[[View], View]:
    """Keep a route that is not part of the API (a page, a file) out of the document."""
    def mark(view: View) -> View:
        _OPERATIONS[view] = reason
        return view
    return mark


class _Components:
    """The models the operations name; `ref` collects them for components/schemas."""

    def __init__(self) -> None:
        self.models: dict[str, type[BaseModel]] = {"ErrorResponse": ErrorResponse}

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        self.models[model.__name__] = model
        return {"$ref": REF.format(model=model.__name__)}

    def schema(self, value: Schema) -> dict[str, Any]:
        if isinstance(value, list):
            return {"type": "array", "items": self.schema(value[0])}
        if isinstance(value, type) and issubclass(value, BaseModel):
            return self.ref(value)
        return value

    def schemas(self) -> dict[str, Any]:
        _, defs = models_json_schema([(m, "validation") for m in self.models.values()],
                                     ref_template=REF)
        schemas = defs.get("$defs", {})
        for name in dataset_names():  # the `params` each dataset takes in a job
            params = get_dataset(name).Params
            schemas.update(params.model_json_schema(ref_template=REF).pop("$defs", {}))
            schemas[f"{name}.params"] = params.model_json_schema(ref_template=REF)
        return schemas


def _success(data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["status", "data"],
            "properties": {"status": {"const": "success"},
                           "data": {"type": "object", "properties": data}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _path(rule: Rule) -> tuple[str, list[dict[str, Any]]]:
    """The OpenAPI path of a route (`<int:job_id>` -> `{job_id}`) and its parameters,
    typed from the route's converters (an int's min and max are kept)."""
    params = []
    for name in rule.arguments:
        converter = rule._converters[name]
        if isinstance(converter, NumberConverter):
            schema: dict[str, Any] = {"type": "integer"}
            schema.update({k: v for k, v in (("minimum", converter.min),
                                             ("maximum", converter.max)) if v is not None})
        else:
            schema = {"type": "string"}
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), params


def _operation(op: Operation, params: list[dict[str, Any]],
               components: _Components) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary}
    if op.query is not None:
        schema = op.query.model_json_schema(ref_template=REF)
        params = [*params, *({"name": name, "in": "query", "required": False, "schema": prop}
                             for name, prop in schema["properties"].items())]
    if params:
        out["parameters"] = params
    if op.body:
        refs = [components.ref(m) for m in op.body]
        out["requestBody"] = {"required": op.body_required, "content": _json(
            refs[0] if len(refs) == 1 else {"oneOf": refs})}
    if op.responses is not None:
        responses = dict(op.responses)
    else:
        body = _json(_success({k: components.schema(v) for k, v in op.data.items()}))
        responses = {str(op.status): {"description": op.summary, "content": body}}
        for status, description in op.also.items():
            responses[str(status)] = {"description": description, "content": body}
    for code in op.errors:
        responses[str(code)] = {"description": "error",
                                "content": _json(components.ref(ErrorResponse))}
    out["responses"] = responses
    return out


def left_out(view: View) -> str | None:
    """Why `view` is not in the document (`undocumented`), or None."""
    op = _OPERATIONS.get(view)
    return op if isinstance(op, str) else None


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes, in the order they were added."""
    components = _Components()
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        op = _OPERATIONS.get(view)
        if isinstance(op, str):
            continue
        if op is None:
            log.warning("[API] route %s has no @documented: left out of /openapi.json",
                        rule.rule)
            continue
        path, params = _path(rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(op, params, components)
    return {"openapi": "3.1.0",
            "info": {"title": "LLM Bench Shower", "version": "0.1.0"},
            "paths": paths, "components": {"schemas": components.schemas()}}


@bp.get("/openapi.json")
@documented("this document: every route of the API with its parameters, bodies and "
            "answers (the `data` of its JSON envelope), generated from the routes",
            responses={"200": {"description": "an OpenAPI 3.1 document",
                               "content": _json({"type": "object"})}})
def openapi():
    return build_spec(current_app)
