"""Keyword search inside a generation: SQLite FTS5 (`layout.KEYWORDS_SCHEMA`) over each live
item's words, ranked by BM25, built at each commit beside the metadata fields.

An image's words are its captions, its file name and its string metadata; a text's are the
text and its own string metadata. Matching is by whole words (case and accents folded), any
of the query's words (OR), so a rare word alone finds its item.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import PurePath
from typing import Any

from retrieval.errors import InvalidQueryError
from retrieval.fields.filters import Filter
from retrieval.fields.values import scalars, storable
from retrieval.store.fields import OWNER, where_sql
from retrieval.store.layout import KEYWORDS_SCHEMA

MAX_WORDS = 32  # words of a keyword query that count
_WORD = re.compile(r"\w+")
_ROWS = ("SELECT id, modality, path, text, captions, metadata FROM items WHERE deleted = 0")


def build(db: sqlite3.Connection) -> None:
    """Write the keyword index from scratch."""
    db.executescript(KEYWORDS_SCHEMA)
    db.executemany("INSERT INTO item_words (rowid, body) VALUES (?, ?)", _bodies(db, _ROWS, []))


def update(db: sqlite3.Connection, added: Sequence[int]) -> None:
    """Add the words of the items `added` to a copy of the parent's index (one written before
    keyword search existed is built from scratch). Deleted items keep their words until the
    next compaction rebuilds it; searches join live items only, so they are never found."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'item_words'").fetchone():
        build(db)
        return
    ids = sorted(int(i) for i in added)
    for start in range(0, len(ids), 900):
        part = ids[start:start + 900]
        db.executemany("INSERT INTO item_words (rowid, body) VALUES (?, ?)", list(_bodies(
            db, f"{_ROWS} AND id IN ({','.join('?' * len(part))})", part)))


def _bodies(db: sqlite3.Connection, sql: str, params: list[int]) -> Iterator[tuple[int, str]]:
    for item_id, modality, path, text, captions, metadata in db.cursor().execute(sql, params):
        words = [text or ""] if modality == "text" else list(json.loads(captions))
        if path:
            words.append(PurePath(path).name)
        data = json.loads(metadata)
        if isinstance(data, dict):
            words += [value for raw in data.values() for value in scalars(raw)
                      if isinstance(value, str)]
        body = storable("\n".join(word for word in words if word))
        if body:
            yield item_id, body


def match_expression(text: str) -> str:
    """An FTS5 query matching any word of `text`, each quoted (no FTS5 syntax from users)."""
    words = list(dict.fromkeys(word.lower() for word in _WORD.findall(text)))[:MAX_WORDS]
    if not words:
        raise InvalidQueryError("a keyword search needs at least one word (letters or digits)")
    return " OR ".join(f'"{word}"' for word in words)


def keyword_sql(modality: str, match: str, where: Filter | None,
                limit: int) -> tuple[str, list[Any]]:
    """SELECT (id, BM25 score: higher is better) of the best live items of `modality` whose
    words match, among those `where` matches; ties by id."""
    condition, params = where_sql(where, OWNER[modality]) if where is not None else ("1", [])
    sql = ("SELECT items.id, -bm25(item_words) AS score FROM item_words "
           "JOIN items ON items.id = item_words.rowid WHERE item_words MATCH ? AND "
           f"items.deleted = 0 AND items.modality = ? AND {condition} "
           "ORDER BY score DESC, items.id LIMIT ?")
    return sql, [match, modality, *params, int(limit)]
