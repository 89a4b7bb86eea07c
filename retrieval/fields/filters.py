"""Metadata filters: one JSON language for the HTTP API, the `Searcher` and the CLI, parsed and
checked against a generation's field types (`retrieval.fields.values`) into a typed `Filter`
before anything runs; `retrieval.store.fields` compiles it to parameterised SQL.

    {"and": [{"field": "folder", "eq": "2024/trip"}, {"field": "taken", "gte": "2024-06-01"}]}

A condition is {"field": NAME, OP: VALUE} with exactly one OP:

    eq, ne             a value of the field's type
    in, nin            a non-empty list of such values (at most MAX_IN)
    gt, gte, lt, lte   number, date-time and string fields (strings compare by code point)
    prefix             string fields: a value that starts with the given text
    exists             true: the item has the field; false: it has not

and conditions combine as {"and": [...]}, {"or": [...]} (non-empty lists) and {"not": F}.
Date-time values are ISO-8601 strings ("2024-06-01", "2024-06-01T12:00:00+02:00"; no zone
means UTC); number values are JSON numbers; boolean values true or false.

What matches: a condition other than `exists` matches only items that have the field; `ne` and
`nin` match items that have it with no value among those given (a list-valued field matches
`eq` or `in` when any of its values does); `not` is the plain complement, items without the
field included. A caption text is matched by its image's fields.

Every mistake is a FilterError naming where in the filter it is, and the field and its type
when a field is involved: nothing is silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from retrieval.errors import FilterError
from retrieval.fields.values import number, parse_datetime, storable

MAX_IN = 500  # values in one in / nin list
MAX_CONDITIONS = 64
MAX_DEPTH = 16
COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte")
LISTS = ("in", "nin")
OPERATORS = (*COMPARISONS, *LISTS, "prefix", "exists")
COMBINATORS = ("and", "or", "not")
# Which operators each field type takes (booleans are not ordered; only strings have prefixes).
ALLOWED = {"string": OPERATORS,
           "number": tuple(op for op in OPERATORS if op != "prefix"),
           "datetime": tuple(op for op in OPERATORS if op != "prefix"),
           "boolean": ("eq", "ne", "in", "nin", "exists")}
_EXPECTED = {"string": "a string", "number": "a number within about ±1.8e308",
             "boolean": "true or false",
             "datetime": "an ISO-8601 date or date-time string (e.g. 2024-06-01)"}


@dataclass(frozen=True)
class Condition:
    """One test on one field: `values` are encoded for storage (str for string fields,
    seconds for date-times, float for numbers, 0.0/1.0 for booleans; (true|false,) for exists)."""

    field: str
    type: str
    op: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Combined:
    op: str  # "and" or "or"
    parts: tuple[Filter, ...]


@dataclass(frozen=True)
class Negated:
    part: Filter


Filter = Condition | Combined | Negated


def canonical(raw: Any) -> str:
    """The filter's JSON text with sorted keys: what binds a paging cursor to it."""
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)


def parse_filter(raw: Any, fields: Mapping[str, str]) -> Filter:
    """The typed filter of `raw` (parsed JSON), checked against {field name: type}."""
    counter = [0]
    return _parse(raw, fields, "filter", 0, counter)


def _parse(raw: Any, fields: Mapping[str, str], where: str, depth: int,
           counter: list[int]) -> Filter:
    if depth > MAX_DEPTH:
        raise FilterError(f"{where}: filters nest at most {MAX_DEPTH} deep")
    if not isinstance(raw, dict):
        raise FilterError(f"{where}: a filter is a JSON object such as "
                          '{"field": "folder", "eq": "2024/trip"}, got ' + _show(raw))
    if "field" in raw:
        counter[0] += 1
        if counter[0] > MAX_CONDITIONS:
            raise FilterError(f"{where}: a filter may hold at most {MAX_CONDITIONS} conditions")
        return _condition(raw, fields, where)
    keys = list(raw)
    if len(keys) != 1 or keys[0] not in COMBINATORS:
        raise FilterError(f"{where}: expected one of {', '.join(COMBINATORS)} or a condition "
                          f"with \"field\", got keys {keys}")
    op, body = keys[0], raw[keys[0]]
    if op == "not":
        return Negated(_parse(body, fields, f"{where}.not", depth + 1, counter))
    if not isinstance(body, list) or not body:
        raise FilterError(f"{where}.{op}: a non-empty list of filters, got {_show(body)}")
    return Combined(op, tuple(_parse(part, fields, f"{where}.{op}[{n}]", depth + 1, counter)
                              for n, part in enumerate(body)))


def _condition(raw: dict[str, Any], fields: Mapping[str, str], where: str) -> Condition:
    name = raw["field"]
    if not isinstance(name, str):
        raise FilterError(f"{where}.field: a field name (a string), got {_show(name)}")
    ops = [key for key in raw if key != "field"]
    if len(ops) != 1 or ops[0] not in OPERATORS:
        raise FilterError(f"{where}: a condition on field {name!r} needs exactly one operator "
                          f"of {', '.join(OPERATORS)}, got {ops or 'none'}", name,
                          fields.get(name))
    op = ops[0]
    if name not in fields:
        known = ", ".join(f"{field} ({kind})" for field, kind in sorted(fields.items())[:30])
        raise FilterError(f"{where}: unknown field {name!r}; this index's fields are "
                          f"{known or 'none (its items carry no metadata)'}", name)
    kind = fields[name]
    if op not in ALLOWED[kind]:
        raise FilterError(f"{where}: field {name!r} is {kind}; {op!r} applies to "
                          f"{_types_taking(op)} fields (a {kind} field takes "
                          f"{', '.join(ALLOWED[kind])})", name, kind)
    return Condition(name, kind, op, _values(raw[op], name, kind, op, where))


def _values(value: Any, name: str, kind: str, op: str, where: str) -> tuple[Any, ...]:
    where = f"{where}.{op}"
    if op == "exists":
        if not isinstance(value, bool):
            raise FilterError(f"{where}: exists takes true or false, got {_show(value)}",
                              name, kind)
        return (value,)
    if op in LISTS:
        if not isinstance(value, list) or not value or len(value) > MAX_IN:
            raise FilterError(f"{where}: {op} takes a list of 1 to {MAX_IN} values of field "
                              f"{name!r} ({kind}), got {_show(value)}", name, kind)
        return tuple(dict.fromkeys(_value(one, name, kind, f"{where}[{n}]")
                                   for n, one in enumerate(value)))
    return (_value(value, name, kind, where),)


def _value(value: Any, name: str, kind: str, where: str) -> Any:
    """One filter value, checked against the field's type and encoded as stored."""
    if kind == "string" and isinstance(value, str):
        return storable(value)
    if kind == "boolean" and isinstance(value, bool):
        return float(value)
    stored = number(value) if kind == "number" else None  # None also for a huge integer
    if stored is not None:
        return stored
    if kind == "datetime":
        seconds = parse_datetime(value)
        if seconds is not None:
            return seconds
    raise FilterError(f"{where}: field {name!r} is {kind} and needs {_EXPECTED[kind]}, got "
                      f"{_show(value)}", name, kind)


def _types_taking(op: str) -> str:
    return " and ".join(kind for kind, ops in ALLOWED.items() if op in ops)


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, default=str)
    except (RecursionError, ValueError):
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."
