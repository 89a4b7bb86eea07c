"""The types of filterable metadata fields, and the one rule that infers them.

Every key of an item's metadata (a manifest's extra columns, a sidecar's keys, the folder
facts the indexer reads, the metadata of admin writes) is a field. Its type is inferred over
all its values in a generation:

    boolean   every value is true or false
    number    every value is a number (bool does not count as one)
    datetime  every value is a string in ISO-8601 form: 2024-06-01, 2024-06-01T12:30,
              2024-06-01 12:30:05.5+02:00, ...Z (a time without a zone is read as UTC)
    string    anything else; a field whose values mix types is a string field, and its
              non-string values are compared as their JSON text (3, 1.5, true)

A list value gives the field several values (a filter matches when any of them does); null,
objects and non-finite numbers are no values at all (the item lacks that field), and so is an
integer beyond a float's range (about ±1.8e308), which no field can store (writers that take
metadata from a client refuse it instead: `check_metadata`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from retrieval.errors import MetadataError

TYPES = ("string", "number", "boolean", "datetime")
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?"
                  r"(Z|[+-]\d{2}:?\d{2})?")


def scalars(value: Any) -> Iterator[bool | float | str]:
    """The field values in one metadata value (a list gives each element)."""
    for element in _elements(value):
        if isinstance(element, bool | str) or number(element) is not None:
            yield element


def number(value: Any) -> float | None:
    """A JSON number (not a boolean) as the finite float it is stored as, else None. JSON
    integers have no size limit and float() of one beyond ±1.8e308 raises OverflowError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        stored = float(value)
    except OverflowError:
        return None
    return stored if math.isfinite(stored) else None


def check_metadata(metadata: dict[str, Any]) -> None:
    """MetadataError naming the first key whose value holds an integer no field can store;
    what `scalars` would silently drop is refused when a client sent it."""
    for name, value in metadata.items():
        for element in _elements(value):
            whole = isinstance(element, int) and not isinstance(element, bool)
            if whole and number(element) is None:
                digits = round(element.bit_length() * math.log10(2))  # str() of one may fail
                raise MetadataError(f"metadata.{name}: an integer of about {digits} digits is "
                                    "beyond the range of a number field (about ±1.8e308)", name)


def _elements(value: Any) -> tuple[Any, ...] | list[Any]:
    return value if isinstance(value, list | tuple) else (value,)


def parse_datetime(text: Any) -> float | None:
    """Seconds since the epoch (UTC) of an ISO-8601 date or date-time string, else None."""
    if not isinstance(text, str):
        return None
    return _parse_iso(text)


@lru_cache(maxsize=65_536)  # metadata repeats its dates (a folder's photos share days)
def _parse_iso(text: str) -> float | None:
    if not _ISO.fullmatch(text):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:  # e.g. month 13
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def as_text(value: bool | float | str) -> str:
    """A value of a string field as compared: strings as they are (but storable), the rest
    as JSON text."""
    return storable(value) if isinstance(value, str) else json.dumps(value)


def storable(text: str) -> str:
    """`text` as SQLite can store it: a lone UTF-16 surrogate (valid in JSON, common in
    scraped captions) cannot be encoded as UTF-8, so each becomes '?'. Stored values and
    filter values pass through here alike, so they still compare equal."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


@dataclass
class Inference:
    """The running type of one field while its values stream past (memory: O(1))."""

    booleans: bool = False
    numbers: bool = False
    strings: bool = False
    all_dates: bool = True
    items: int = 0  # items that have at least one value

    def see(self, value: bool | float | str) -> None:
        if isinstance(value, bool):
            self.booleans = True
        elif isinstance(value, str):
            self.strings = True
            self.all_dates = self.all_dates and parse_datetime(value) is not None
        else:
            self.numbers = True

    @property
    def type(self) -> str:
        if self.booleans + self.numbers + self.strings != 1:
            return "string"
        if self.booleans:
            return "boolean"
        if self.numbers:
            return "number"
        return "datetime" if self.all_dates else "string"


def encode(value: bool | float | str, field_type: str) -> tuple[str | None, float | None]:
    """(str_value, num_value) of one value of a field of `field_type`, as stored and
    compared: strings as text, numbers and booleans (0/1) as numbers, date-times as seconds."""
    if field_type == "string":
        return as_text(value), None
    if field_type == "datetime":
        return None, parse_datetime(value)
    return None, float(value)
