"""Browsing by a field on a real generation (20,000 images in `make test`, 200,000 in
`make soak`, through CLIPDEX_SOAK_BROWSE_ITEMS): every ordering (numbers, strings,
list-valued fields, ties, both directions, images and texts, with filters and deletions)
equals an exact Python sort of the items' metadata, at any offset and through cursors; and a
statement that never ends holds up no other search, stops at the time limit, and stops at
once when its generation is closed."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.errors import QueryTimeoutError
from retrieval.fields.filters import parse_filter
from retrieval.models.identity import ModelIdentity
from retrieval.search.query import Listing, Query
from retrieval.search.searcher import Searcher
from retrieval.store import (
    ItemRecord,
    StoreOptions,
    fields,
    open_generation,
    update_generation,
    write_generation,
)
from retrieval.store.readers import QUERY_SECONDS

DIM, CAPTIONED, FREE = 4, 1_000, 500
IMAGES = int(os.environ.get("CLIPDEX_SOAK_BROWSE_ITEMS", "20000"))
MODEL = ModelIdentity(sha256="b0" * 32, arch="synthetic", embed_dim=DIM)
# Code-point order, not a collation: upper case before lower, accented letters last.
WORDS = ["Zed", "apple", "b07", "b7", "zed", "éclair", "ß", "b07x"]
DELETED = list(range(5, IMAGES, 997))  # some of them captioned: their captions go too
# A statement only a time limit or a close ends.
ENDLESS = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
           "SELECT count(*) FROM c")


def image_metadata(count: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Small value ranges, so ties are everywhere; each field missing on some items (the
    random draws are made for all items at once: per-item draws cost seconds at 200,000)."""
    stars = rng.integers(0, 50, count).tolist()
    tags = rng.integers(0, len(WORDS), (count, 3)).tolist()
    sizes = (rng.integers(-40, 40, (count, 4)) / 4).tolist()
    rows: list[dict[str, Any]] = []
    for i in range(count):
        data: dict[str, Any] = {}
        if i % 10:
            data["stars"] = stars[i]
        if i % 7:
            data["tags"] = [WORDS[n] for n in tags[i][:1 + i % 3]]
        if i % 3 == 0:
            data["sizes"] = sizes[i][:1 + i % 4]
        rows.append(data)
    return rows


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[int, ItemRecord]]:
    """An IMAGES-image generation, captions of the first CAPTIONED images (two each) and free
    texts with their own metadata, written by the store's writer, then some images deleted."""
    rng = np.random.default_rng(7)
    records = [ItemRecord(i, "image", metadata=metadata)
               for i, metadata in enumerate(image_metadata(IMAGES, rng))]
    next_id = IMAGES
    for image in range(CAPTIONED):
        records += [ItemRecord(next_id + n, "text", text=f"caption {n} of {image}",
                               image_id=image) for n in range(2)]
        next_id += 2
    records += [ItemRecord(next_id + n, "text", text=f"note {n}",
                           metadata={"stars": n % 13, "tags": WORDS[n % len(WORDS)]})
                for n in range(FREE)]
    texts = sum(record.modality == "text" for record in records)
    root = tmp_path_factory.mktemp("browse")
    write_generation(root, MODEL, records, {"image": unit(rng.normal(size=(IMAGES, DIM))),
                                            "text": unit(rng.normal(size=(texts, DIM)))},
                     StoreOptions(index_kind="flat"))
    update_generation(root, MODEL, delete_ids=DELETED, options=StoreOptions(index_kind="flat"))
    gone = set(DELETED)
    live = {r.id: r for r in records if r.id not in gone and r.image_id not in gone}
    return root, live


@pytest.fixture(scope="module")
def generation(corpus):
    with open_generation(corpus[0]) as generation:
        yield generation


def oracle(live: dict[int, ItemRecord], target: str, field: str, descending: bool,
           keep: Callable[[dict[str, Any]], bool] = lambda metadata: True) -> list[int]:
    """The listing by a plain sort: each item keyed by its owner's largest value of `field`
    (descending) or smallest (ascending), ties by id; items without the field left out."""
    keyed = []
    for record in live.values():
        if record.modality != target:
            continue
        owner = live[record.image_id] if record.image_id is not None else record
        found = values(owner.metadata, field)
        if found and keep(owner.metadata):
            keyed.append(((max if descending else min)(found), record.id))
    keyed.sort(reverse=descending)
    return [item for _, item in keyed]


def values(metadata: dict[str, Any], field: str) -> list[Any]:
    value = metadata.get(field)
    return value if isinstance(value, list) else [] if value is None else [value]


def has_tag(tag: str) -> Callable[[dict[str, Any]], bool]:
    return lambda metadata: tag in values(metadata, "tags")


CASES = [  # target, field, descending, filter and its plain-Python reading
    ("image", "stars", True, None, None),
    ("image", "tags", False, None, None),
    ("image", "sizes", True, {"field": "tags", "eq": "b07"}, has_tag("b07")),
    ("image", "tags", False, {"not": {"field": "stars", "lt": 10}},
     lambda metadata: not any(stars < 10 for stars in values(metadata, "stars"))),
    ("text", "stars", True, None, None),
    ("text", "tags", False, {"field": "tags", "prefix": "b07"},
     lambda metadata: any(tag.startswith("b07") for tag in values(metadata, "tags"))),
]


@pytest.mark.parametrize(("target", "field", "descending", "raw", "keep"), CASES)
def test_every_ordering_equals_a_python_sort_at_any_offset(generation, corpus, target, field,
                                                           descending, raw, keep):
    live = corpus[1]
    expected = oracle(live, target, field, descending, keep or (lambda metadata: True))
    where = None if raw is None else parse_filter(raw, generation.fields())
    order = (field, generation.fields()[field])
    whole = generation.listing(target, where, order, descending, 0, len(live))
    assert whole == expected
    for offset in (0, 1, len(expected) // 2, len(expected) - 3):
        page = generation.listing(target, where, order, descending, offset, 7)
        assert page == expected[offset:offset + 7]
    assert generation.listing(target, where, order, descending, len(expected), 7) == []


def test_cursors_page_through_an_ordering_without_gaps_or_repeats(generation, corpus):
    expected = oracle(corpus[1], "image", "tags", True, has_tag("ß"))
    searcher = Searcher(generation)
    seen: list[int] = []
    cursor = None
    for _ in range(4):
        page = searcher.browse(Listing(filter={"field": "tags", "eq": "ß"}, order_by="tags",
                                       k=250, cursor=cursor))
        seen += [hit.id for hit in page.hits]
        cursor = page.next_cursor
    assert seen == expected[:1000]


def test_a_statement_that_never_ends_blocks_no_other_search(corpus, monkeypatch):
    """One thread's statement runs on while others search (each thread has its own
    connection), and closing the generation stops it at once."""
    root, live = corpus
    generation = open_generation(root)  # the default limit, QUERY_SECONDS
    outcome: dict[str, Any] = {}

    def run_endless() -> None:
        try:
            generation.listing("image", None, None, True, 0, 10)
        except QueryTimeoutError as error:
            outcome["error"] = error
        outcome["ended"] = time.monotonic()

    with monkeypatch.context() as patch:  # a browse whose statement never ends
        patch.setattr(fields, "listing_sql", lambda *args: (ENDLESS, []))
        endless = threading.Thread(target=run_endless, daemon=True)
        endless.start()
        time.sleep(0.5)  # it has its statement and is running it
    assert endless.is_alive()

    def search_meanwhile() -> None:
        searcher = Searcher(generation)
        where = {"field": "tags", "eq": "apple"}
        vector = unit(np.ones((1, DIM)))[0].tolist()
        outcome["hits"] = searcher.search(Query.vector(vector, k=5, filter=where)).hits
        outcome["page"] = searcher.browse(Listing(order_by="stars", k=5)).hits

    meanwhile = threading.Thread(target=search_meanwhile, daemon=True)
    meanwhile.start()
    meanwhile.join(timeout=30)  # generous: it takes milliseconds
    assert not meanwhile.is_alive(), "a search waited for another thread's statement"
    assert len(outcome["hits"]) == 5
    assert all("apple" in hit.item.metadata["tags"] for hit in outcome["hits"])
    assert [hit.id for hit in outcome["page"]] == oracle(live, "image", "stars", True)[:5]
    assert endless.is_alive()

    closed = time.monotonic()
    generation.close()
    endless.join(timeout=10)
    assert not endless.is_alive()
    assert outcome["ended"] - closed < QUERY_SECONDS / 2  # at once, not at the limit
    assert "closed" in str(outcome["error"])


def test_a_statement_past_the_time_limit_is_stopped(corpus, monkeypatch):
    with open_generation(corpus[0], query_seconds=0.5) as generation:
        with monkeypatch.context() as patch:
            patch.setattr(fields, "listing_sql", lambda *args: (ENDLESS, []))
            started = time.monotonic()
            with pytest.raises(QueryTimeoutError, match="0.5 s limit"):
                Searcher(generation).browse(Listing(k=5))
            assert time.monotonic() - started < 10
        # the connection that was stopped answers the next statement
        assert len(generation.listing("image", None, None, True, 0, 3)) == 3
