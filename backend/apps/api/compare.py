"""/api/compare: two jobs compared item by item (see results.paired_comparison)."""

from __future__ import annotations

from flask import Blueprint, current_app, request
from pydantic import Field

from backend.apps.api.errors import ApiError
from backend.apps.api.openapi import documented
from backend.apps.api.results import effective_params
from backend.apps.api.schemas import Query
from backend.queue import results

bp = Blueprint("compare", __name__, url_prefix="/api/compare")


class CompareQuery(Query):
    a: int = Field(ge=1, le=9223372036854775807, description="the first job's id")
    b: int = Field(ge=1, le=9223372036854775807, description="the second job's id")


@bp.get("")
@documented("two jobs of one dataset compared on their shared items: both right, only A, "
            "only B, both wrong, McNemar's exact p, the difference with its 95% interval, "
            "the items where they disagree, the parameters that differ",
            query=CompareQuery,
            data={"a": {"type": "object"}, "b": {"type": "object"},
                  "same_items": {"type": "boolean"},
                  "differing_params": {"type": "object"},
                  "differing_manifest": {"type": "object", "description": "dotted manifest "
                                         "entries that differ: [a, b]; null when a job has "
                                         "no manifest"},
                  "paired": {"type": "object", "description": "n, binary, a_mean, b_mean, "
                             "both_right, a_only, b_only, both_wrong, mcnemar_p, "
                             "difference (A - B), ci95"},
                  "disagreements_total": {"type": "integer"},
                  "disagreements": [{"type": "object"}],
                  "heatmap_difference": [{"type": "object"}]},
            errors=(404, 422))
def compare():
    query = CompareQuery.model_validate(request.args.to_dict())
    lbs = current_app.extensions["lbs"]
    try:
        data = lbs.results.paired_comparison(query.a, query.b, effective_params)
    except results.CompareError as exc:
        raise ApiError(exc.status, "not_found" if exc.status == 404 else "not_comparable",
                       f"{exc.field}: {exc}", [{"field": exc.field, "message": str(exc)}]
                       ) from None
    return {"status": "success", "data": data}
