"""A generation's filterable metadata fields: the `fields` and `item_fields` tables (schema in
`layout.FIELDS_SCHEMA`), written from the live items' metadata at each commit, so every writer
(the indexer, `index add`, the service's admin writes) gets them the same way. Types follow
`retrieval.fields.values`; the manifest records them too, so a filter is checked before it runs.

A whole generation (and a compacted one) is built from scratch; a derived one updates its
parent's tables: rows of the added items in, rows of the deleted ones out, and a field
re-encoded only when a new value changes its type (a deletion never narrows a type until the
next compaction).

A caption text has no metadata of its own: a filter on texts reads its image's fields.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

from retrieval.fields.filters import Combined, Condition, Filter, Negated
from retrieval.fields.values import Inference, encode, scalars
from retrieval.store.layout import FIELDS_INDEXES, FIELDS_SCHEMA

_LIVE_METADATA = "SELECT id, metadata FROM items WHERE deleted = 0 AND metadata != '{}'"
_CHUNK = 900  # ids per IN (...) statement
# The item whose fields a row of each modality is matched by: a caption text goes by its image.
OWNER = {"image": "items.id", "text": "COALESCE(items.image_id, items.id)"}
# The texts whose fields are row f's (indexed both ways, unlike COALESCE in OWNER).
_TEXT_OWNED = "(items.image_id = f.id OR (items.id = f.id AND items.image_id IS NULL))"
_COMPARE = {"eq": "=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
Row = tuple[int, str, "str | None", "float | None"]


def build(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Write the field tables from scratch; returns {name: {"type", "items"}} for the manifest.
    Two streaming passes (infer, then insert): memory stays O(fields)."""
    db.executescript(FIELDS_SCHEMA)
    inferred: dict[str, Inference] = {}
    _infer(_rows(db, _LIVE_METADATA), inferred)
    types = {name: inference.type for name, inference in inferred.items()}
    db.executemany("INSERT INTO item_fields VALUES (?, ?, ?, ?)",
                   _field_rows(_rows(db, _LIVE_METADATA), types))
    db.executescript(FIELDS_INDEXES)  # after the bulk insert: one sort instead of n updates
    return _save(db, inferred)


def update(db: sqlite3.Connection, added: Sequence[int],
           removed: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Bring a copy of the parent's tables up to date with the items `added` and `removed`
    (tombstoned); a parent written before fields existed is built from scratch."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'fields'").fetchone():
        return build(db)
    inferred = {name: Inference(**json.loads(state)) for name, state in
                db.execute("SELECT name, inference FROM fields")}
    before = {name: inference.type for name, inference in inferred.items()}
    for part in _chunks(removed):
        marks = ",".join("?" * len(part))
        for name, count in db.execute(f"SELECT field, COUNT(DISTINCT id) FROM item_fields "
                                      f"WHERE id IN ({marks}) GROUP BY field", part):
            inferred[name].items -= count
        db.execute(f"DELETE FROM item_fields WHERE id IN ({marks})", part)
    new_rows = [row for part in _chunks(added) for row in _rows(
        db, f"{_LIVE_METADATA} AND id IN ({','.join('?' * len(part))})", part)]
    _infer(new_rows, inferred)
    types = {name: inference.type for name, inference in inferred.items()}
    retyped = {name for name in types if before.get(name, types[name]) != types[name]}
    for name in retyped:  # a new value widened the type: re-encode that field's values
        db.execute("DELETE FROM item_fields WHERE field = ?", [name])
    unchanged = {name: kind for name, kind in types.items() if name not in retyped}
    db.executemany("INSERT INTO item_fields VALUES (?, ?, ?, ?)",
                   _field_rows(new_rows, unchanged))
    if retyped:
        db.executemany("INSERT INTO item_fields VALUES (?, ?, ?, ?)",
                       _field_rows(_rows(db, _LIVE_METADATA), types, only=retyped))
    db.executescript(FIELDS_INDEXES)
    return _save(db, inferred)


def _infer(rows: Iterator[tuple[int, dict[str, Any]]] | list[tuple[int, dict[str, Any]]],
           inferred: dict[str, Inference]) -> None:
    for _, metadata in rows:
        for name, value in metadata.items():
            values = list(scalars(value))
            if values:
                inference = inferred.setdefault(name, Inference())
                inference.items += 1
                for one in values:
                    inference.see(one)


def _save(db: sqlite3.Connection, inferred: dict[str, Inference]) -> dict[str, dict[str, Any]]:
    kept = {name: inferred[name] for name in sorted(inferred) if inferred[name].items > 0}
    db.execute("DELETE FROM fields")
    db.executemany("INSERT INTO fields (name, type, items, inference) VALUES (?, ?, ?, ?)",
                   ((name, i.type, i.items, json.dumps(asdict(i))) for name, i in kept.items()))
    return {name: {"type": i.type, "items": i.items} for name, i in kept.items()}


def _rows(db: sqlite3.Connection, sql: str,
          params: Sequence[Any] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    for item_id, text in db.cursor().execute(sql, list(params)):
        metadata = json.loads(text)
        if isinstance(metadata, dict):
            yield item_id, metadata


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    ids = sorted(int(i) for i in ids)
    for start in range(0, len(ids), _CHUNK):
        yield ids[start:start + _CHUNK]


def _field_rows(rows: Iterator[tuple[int, dict[str, Any]]] | list[tuple[int, dict[str, Any]]],
                types: dict[str, str], only: set[str] | None = None) -> Iterator[Row]:
    for item_id, metadata in rows:
        for name, value in metadata.items():
            if name not in types or (only is not None and name not in only):
                continue
            encoded = (encode(one, types[name]) for one in scalars(value))
            for stored in dict.fromkeys(encoded):  # a repeated value is one row
                yield (item_id, name, *stored)


def matching_sql(modality: str, where: Filter) -> tuple[str, list[Any]]:
    """SELECT of the live ids of `modality` that `where` matches, ascending; every value is a
    bound parameter (field names too), never text in the statement."""
    condition, params = where_sql(where, OWNER[modality])
    sql = f"SELECT id FROM items WHERE deleted = 0 AND modality = ? AND {condition} ORDER BY id"
    return sql, [modality, *params]


def listing_sql(modality: str, where: Filter | None, order: tuple[str, str] | None,
                descending: bool) -> tuple[str, list[Any]]:
    """SELECT walking the live ids of `modality` that `where` matches (all, for None) in
    listing order: by id (newest first when descending), or by the field `order` = (name,
    type), whose items without it are left out; ties by id. Read a page with `first_distinct`,
    which stops the walk: a page costs about offset + limit index steps, never a sort of
    every item.

    By a field, the walk goes down the field's (field, value, id) index and meets an item
    once per value: first at its largest value when descending, its smallest otherwise,
    which is how a list-valued field sorts. The loop order and the index are forced (CROSS
    JOIN, INDEXED BY): SQLite's own choice, a subquery per item over the same index, was
    quadratic."""
    direction = "DESC" if descending else "ASC"
    if order is None:
        condition, params = _where(where, OWNER[modality])
        sql = (f"SELECT id FROM items WHERE deleted = 0 AND modality = ? AND {condition} "
               f"ORDER BY id {direction}")
        return sql, [modality, *params]
    name, kind = order
    column, index = (("str_value", "item_fields_str") if kind == "string"
                     else ("num_value", "item_fields_num"))
    # `f.id` is the owner of the fields: an image, a free text, or the image of captions
    # (whose ties SQLite sorts by text id one value at a time, as the walk goes)
    condition, params = _where(where, "f.id")
    join, tie = "items.id = f.id", "f.id"
    if modality == "text":
        join, tie = _TEXT_OWNED, "items.id"
    sql = (f"SELECT items.id FROM item_fields AS f INDEXED BY {index} CROSS JOIN items "
           f"WHERE f.field = ? AND f.{column} IS NOT NULL AND {join} AND items.deleted = 0 "
           f"AND items.modality = ? AND {condition} "
           f"ORDER BY f.{column} {direction}, {tie} {direction}")
    return sql, [name, modality, *params]


def first_distinct(rows: Iterable[tuple], offset: int, limit: int) -> list[int]:
    """The ids offset .. offset + limit - 1 among the distinct first columns of `rows`, in
    order; reads no further than that (`rows` may be a cursor over a long walk)."""
    seen: set[int] = set()
    page: list[int] = []
    if limit <= 0:
        return page
    for row in rows:
        item = int(row[0])
        if item in seen:
            continue
        seen.add(item)
        if len(seen) > offset:
            page.append(item)
            if len(page) == limit:
                break
    return page


def _where(where: Filter | None, owner: str) -> tuple[str, list[Any]]:
    return ("1", []) if where is None else where_sql(where, owner)


def where_sql(where: Filter, owner: str) -> tuple[str, list[Any]]:
    """A boolean SQL expression over the items table (`owner` names the id column to match)."""
    if isinstance(where, Negated):
        inner, params = where_sql(where.part, owner)
        return f"NOT ({inner})", params
    if isinstance(where, Combined):
        parts = [where_sql(part, owner) for part in where.parts]
        joiner = " AND " if where.op == "and" else " OR "
        return "(" + joiner.join(sql for sql, _ in parts) + ")", [p for _, ps in parts for p in ps]
    return _condition_sql(where, owner)


def _condition_sql(condition: Condition, owner: str) -> tuple[str, list[Any]]:
    column = "str_value" if condition.type == "string" else "num_value"
    op, values, field = condition.op, list(condition.values), condition.field

    def having(test: str = "", args: list[Any] | None = None) -> tuple[str, list[Any]]:
        return (f"{owner} IN (SELECT id FROM item_fields WHERE field = ?{test})",
                [field, *(args or [])])

    if op == "exists":
        sql, params = having()
        return (sql if values[0] else f"NOT {sql}"), params
    if op in ("in", "nin", "eq", "ne"):
        marks = ",".join("?" * len(values))
        sql, params = having(f" AND {column} IN ({marks})", values)
        if op in ("in", "eq"):
            return sql, params
        present, field_only = having()
        return f"({present} AND NOT {sql})", field_only + params
    if op == "prefix":
        return having(*_prefix_range(values[0]))
    return having(f" AND {column} {_COMPARE[op]} ?", values)


def _prefix_range(prefix: str) -> tuple[str, list[Any]]:
    """Values starting with `prefix` as an index-friendly range: [prefix, prefix's successor)
    (SQLite compares UTF-8 bytes, which order as code points do)."""
    if not prefix:
        return "", []
    last = ord(prefix[-1]) + 1
    if 0xD800 <= last < 0xE000:  # skip the surrogates, which UTF-8 cannot carry
        last = 0xE000
    if last > 0x10FFFF:
        return " AND substr(str_value, 1, ?) = ?", [len(prefix), prefix]
    return " AND str_value >= ? AND str_value < ?", [prefix, prefix[:-1] + chr(last)]
