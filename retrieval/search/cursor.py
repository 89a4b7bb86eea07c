"""Paging cursors: an opaque token for "the page after this one", bound to one query on one
generation. Keyset paging (the (score, id) of the last hit served) survives tiny float
differences between re-encodings of a query, which offsets would turn into repeats or gaps.

A cursor comes back from clients, so decoding trusts nothing: every field is checked for
type and range (no NaN, no infinities, no 5,000-digit integers), and each failure is a
BadCursorError; a cursor of another generation is a StaleCursorError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from retrieval.errors import BadCursorError, StaleCursorError

MAX_CURSOR_CHARS = 512
MAX_ITEM_ID = 2**53 - 1  # ids stay exact in JSON numbers (and within SQLite's range)
_NOT_OURS = ("the cursor is not one this service issued; pass next_cursor from the previous "
             "response unchanged")


@dataclass(frozen=True)
class Cursor:
    generation: str
    fingerprint: str
    after: tuple[float, int]  # (score, id) of the last hit served
    served: int  # hits served so far


def query_fingerprint(*parts: Any) -> str:
    """A short stable hash of what defines a query, so a cursor cannot be reused for another."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def encode_cursor(cursor: Cursor) -> str:
    score, item_id = cursor.after
    payload = {"g": cursor.generation, "f": cursor.fingerprint, "s": score, "i": item_id,
               "n": cursor.served}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def decode_cursor(token: str, generation: str, fingerprint: str, max_served: int) -> Cursor:
    """The cursor in `token`, checked against the query and generation it must belong to."""
    payload = _payload(token)
    try:
        cursor = Cursor(_text(payload["g"]), _text(payload["f"]),
                        (_score(payload["s"]), _integer(payload["i"], MAX_ITEM_ID)),
                        _integer(payload["n"], max_served))
    except KeyError:
        raise BadCursorError(_NOT_OURS) from None
    if cursor.fingerprint != fingerprint:
        raise BadCursorError("this cursor belongs to a different query; send the same query "
                             "(text, target, threshold) with its cursor")
    if cursor.generation != generation:
        raise StaleCursorError(f"the index changed (generation {cursor.generation} -> "
                               f"{generation}) since this cursor was issued; start the search "
                               "again")
    return cursor


def _payload(token: str) -> dict[str, Any]:
    if len(token) > MAX_CURSOR_CHARS:
        raise BadCursorError(_NOT_OURS)
    try:
        raw = base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode("ascii"))
        payload = json.loads(raw, parse_constant=_refuse_constant)
    except (binascii.Error, ValueError, UnicodeError, RecursionError):
        raise BadCursorError(_NOT_OURS) from None
    if not isinstance(payload, dict):
        raise BadCursorError(_NOT_OURS)
    return payload


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a cursor")


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise BadCursorError(_NOT_OURS)
    return value


def _score(value: Any) -> float:
    # bool is an int subclass; 1e400 parses to inf, which no score can be
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadCursorError(_NOT_OURS)
    if isinstance(value, int) and abs(value) > 10**6:  # float() of a huge int overflows
        raise BadCursorError(_NOT_OURS)
    value = float(value)
    if not math.isfinite(value) or abs(value) > 1e6:
        raise BadCursorError(_NOT_OURS)
    return value


def _integer(value: Any, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise BadCursorError(_NOT_OURS)
    return value
