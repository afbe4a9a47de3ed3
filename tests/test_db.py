"""The schema the migrations build is the schema the ORM describes, on both engines.

An empty database is brought up by `MIGRATIONS` (what every existing installation
runs), a second one by `Base.metadata.create_all` (what the models say); both are
read back with the engine's own inspector, so types come out in that engine's
spelling on both sides and a difference is a real difference.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import ENGINES


def _empty_url(request, data_dir, name: str) -> str:
    if request.node.callspec.params["engine"] == "sqlite":
        return f"sqlite:///{data_dir / name}.sqlite3"
    return request.getfixturevalue("postgres").create_database(prefix=name)


def _schema(engine: sa.Engine) -> dict[str, Any]:
    """Tables -> columns (normalised type, nullable, primary key), indexes, unique
    constraints and foreign keys, as the engine reports them."""
    inspector = sa.inspect(engine)
    dialect = engine.dialect
    out: dict[str, Any] = {}
    for table in sorted(set(inspector.get_table_names()) - {"schema_version"}):
        pk = set(inspector.get_pk_constraint(table)["constrained_columns"])
        out[table] = {
            "columns": {c["name"]: (c["type"].compile(dialect=dialect), c["nullable"]
                                    and c["name"] not in pk, c["name"] in pk)
                        for c in inspector.get_columns(table)},
            "indexes": {(i["name"], tuple(i["column_names"]), bool(i["unique"]))
                        for i in inspector.get_indexes(table)
                        # PostgreSQL lists a unique constraint's index as an index too
                        if not i.get("duplicates_constraint")},
            "unique": {(u["name"], tuple(u["column_names"]))
                       for u in inspector.get_unique_constraints(table)},
            "foreign_keys": {(tuple(f["constrained_columns"]), f["referred_table"],
                              tuple(f["referred_columns"]),
                              (f.get("options") or {}).get("ondelete"))
                             for f in inspector.get_foreign_keys(table)},
        }
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_the_migrated_schema_is_the_orm_schema(request, data_dir, engine):
    from backend.queue.db import Base, _create_engine, dispose_engines, get_engine

    migrated = get_engine(_empty_url(request, data_dir, "migrated"))
    declared = _create_engine(_empty_url(request, data_dir, "declared"))
    Base.metadata.create_all(declared)
    try:
        got, want = _schema(migrated), _schema(declared)
        assert set(got) == set(want)
        differences = [f"{table}.{part}: migrated {got[table][part]} != orm {want[table][part]}"
                       for table in sorted(want)
                       for part in ("columns", "indexes", "unique", "foreign_keys")
                       if got[table][part] != want[table][part]]
        assert not differences, "\n".join(differences)
    finally:
        declared.dispose()
        dispose_engines()
