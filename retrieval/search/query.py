"""What a search asks, as plain data: weighted terms (a text, an image, a vector, an indexed
item), the side of the index to search, paging and a score threshold. The HTTP API, the CLI
and notebooks build the same `Query`; `Searcher.search` answers it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from retrieval.errors import InvalidQueryError
from retrieval.fields.filters import canonical
from retrieval.models.choices import MODALITIES
from retrieval.search.cursor import query_fingerprint
from retrieval.search.hybrid import MODES

ZERO_SHOT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Term:
    """One weighted part of a query: exactly one of text, image, vector or item_id."""

    weight: float = 1.0
    text: str | None = None
    image: bytes | Image.Image | None = None  # an encoded file (bytes) or a decoded image
    vector: Sequence[float] | None = None
    item_id: int | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("text", "image", "vector", "item_id")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise InvalidQueryError("each term needs exactly one of text, image, vector, "
                                    f"item_id (got {given or 'none'})")

    def key(self) -> str:
        """What identifies the term for a cursor (a hash for images and vectors)."""
        if self.text is not None:
            return f"text:{self.text}"
        if self.item_id is not None:
            return f"item:{self.item_id}"
        if isinstance(self.image, bytes):
            return "image:" + hashlib.sha256(self.image).hexdigest()
        if self.image is not None:
            return "image:" + hashlib.sha256(self.image.tobytes()).hexdigest()
        return "vector:" + hashlib.sha256(json.dumps(list(map(float, self.vector or ()))
                                                     ).encode()).hexdigest()


@dataclass(frozen=True)
class Query:
    """Top-k of `target` for the weighted sum of the terms' unit embeddings."""

    terms: tuple[Term, ...]
    target: str = "image"
    k: int = 10
    threshold: float | None = None
    cursor: str | None = None  # next_cursor of the previous page
    extra: tuple[str, ...] = field(default=())  # more that defines the query (for cursors)
    filter: dict[str, Any] | None = None  # metadata filter as JSON (see retrieval.fields.filters)
    mode: str = "vector"  # or "keyword" (BM25) or "hybrid" (RRF of both; retrieval.search.hybrid)
    keywords: str | None = None  # the words for keyword/hybrid (default: the text terms)
    dedup: bool = False  # collapse near-duplicates among a page's hits (retrieval.search.dedup)
    min_relevance: float | None = None  # cut where the calibrated relevance falls below it
    # a date field: the relevant hits (the best `candidates` by score, cut at min_relevance)
    # in date order, newest first unless `descending` is False (retrieval.search.dates)
    order_by: str | None = None
    descending: bool = True
    candidates: int = 500

    def __post_init__(self) -> None:
        if self.target not in MODALITIES:
            raise InvalidQueryError(f"target must be one of {MODALITIES}, got {self.target!r}")
        if self.mode not in MODES:
            raise InvalidQueryError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "vector" and self.threshold is not None:
            raise InvalidQueryError("threshold is a cosine cutoff: it applies in vector mode "
                                    f"only, not {self.mode}")
        if self.mode != "vector" and not self.keyword_text():
            raise InvalidQueryError(f"{self.mode} mode needs words: a text term or keywords")
        if not self.terms:
            raise InvalidQueryError("a query needs at least one term")
        if self.k < 1:
            raise InvalidQueryError(f"k must be at least 1, got {self.k}")
        if self.min_relevance is not None and not 0.0 <= self.min_relevance <= 1.0:
            raise InvalidQueryError(f"min_relevance is a probability in [0, 1], got "
                                    f"{self.min_relevance}")
        if self.min_relevance is not None and self.mode != "vector":
            raise InvalidQueryError("min_relevance applies to vector-mode scores only")
        if self.order_by is not None and self.mode != "vector":
            raise InvalidQueryError("order_by re-orders the relevant hits of a vector-mode "
                                    f"query, not {self.mode}")
        if not 1 <= self.candidates <= 10_000:
            raise InvalidQueryError(f"candidates must be 1 to 10000, got {self.candidates}")

    def query_modality(self) -> str | None:
        """'text' or 'image' when every term is of that kind (what a relevance calibration
        was fitted for), else None."""
        kinds = {"text" if term.text is not None else "image" if term.image is not None
                 else "other" for term in self.terms}
        return next(iter(kinds)) if len(kinds) == 1 and "other" not in kinds else None

    @classmethod
    def text(cls, text: str, **options) -> Query:
        return cls((Term(text=text),), **options)

    @classmethod
    def image(cls, image: bytes | Image.Image, **options) -> Query:
        return cls((Term(image=image),), **options)

    @classmethod
    def vector(cls, vector: Sequence[float], **options) -> Query:
        return cls((Term(vector=vector),), **options)

    @classmethod
    def item(cls, item_id: int, **options) -> Query:
        return cls((Term(item_id=item_id),), **options)

    def keyword_text(self) -> str:
        """The words a keyword or hybrid search looks for."""
        if self.keywords is not None:
            return self.keywords
        return " ".join(term.text for term in self.terms
                        if term.text is not None and term.weight > 0)

    def fingerprint(self) -> str:
        """Everything that defines the ranking (not k, not the cursor): a cursor issued for one
        query is refused for another."""
        terms = [(term.weight, term.key()) for term in self.terms]
        more: tuple[str, ...] = ()  # a plain vector query's fingerprint is as it always was
        if self.filter is not None:
            more += (canonical(self.filter),)
        if self.mode != "vector":
            more += (self.mode, self.keyword_text())
        if self.dedup or self.min_relevance is not None:
            more += (f"dedup={self.dedup}", f"min_relevance={self.min_relevance}")
        if self.order_by is not None:
            more += (f"order_by={self.order_by}", self.descending, self.candidates)
        return query_fingerprint(terms, self.target, self.threshold, self.extra, *more)


@dataclass(frozen=True)
class Listing:
    """The items a filter matches, with no query to rank them: newest first (highest id
    first; ids grow as items are added), or by the field `order_by`."""

    filter: dict[str, Any] | None = None  # None: every item of the target
    target: str = "image"
    order_by: str | None = None  # a field; items without it are left out
    descending: bool = True
    k: int = 10
    cursor: str | None = None

    def __post_init__(self) -> None:
        if self.target not in MODALITIES:
            raise InvalidQueryError(f"target must be one of {MODALITIES}, got {self.target!r}")
        if self.k < 1:
            raise InvalidQueryError(f"k must be at least 1, got {self.k}")

    def fingerprint(self) -> str:
        return query_fingerprint("listing", canonical(self.filter), self.target, self.order_by,
                                 self.descending)
