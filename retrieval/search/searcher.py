"""Answer whole queries against one index generation: a `Query` (weighted text, image, vector
and item terms, paging, a threshold) in, a page of hits with its cursor out; zero-shot
classification and captioning by retrieval. No web framework here: a notebook, the CLI and the
service all call the same `Searcher`, each with the encoder that suits it (see encoders.py).

The generation is anything with the interface of `GenerationLike` (`retrieval.store.Generation`
or the exact in-memory one the tests use).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrieval.errors import (
    FilterError,
    IndexMismatchError,
    InvalidQueryError,
    TooDeepError,
    UnknownItemError,
)
from retrieval.fields.filters import Filter, parse_filter
from retrieval.models.choices import MODALITIES
from retrieval.search import dates, refine
from retrieval.search.calibration import Calibration
from retrieval.search.cursor import Cursor, decode_cursor, encode_cursor
from retrieval.search.hybrid import HYBRID_DEPTH, fuse
from retrieval.search.query import ZERO_SHOT_TEMPLATE, Listing, Query, Term
from retrieval.search.query_encoders import ImageLike, QueryEncoder
from retrieval.store.manifest import mismatch_note

MAX_DEPTH = 10_000  # deepest hit reachable by paging
SLACK = 16  # extra hits fetched past a page's end, so float wobble cannot drop one
Vector = np.ndarray  # (d,) float32, L2-normalised


class GenerationLike(Protocol):
    """What a Searcher uses of an index generation, all of it."""

    name: str
    embed_dim: int
    model_sha256: str | None  # the fingerprint of the model that built it (None: not known)
    root: Path | None  # the index directory (stored relative paths resolve against it)

    def count(self, modality: str) -> int: ...
    # `within`: ascending ids to search among (only passed for a filtered query)
    def search(self, modality: str, queries: np.ndarray, k: int,
               within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]: ...
    def fields(self) -> dict[str, str]: ...  # filterable field -> type (filtered queries)
    def matching_ids(self, modality: str, where: Any) -> np.ndarray: ...  # a parsed Filter
    def listing(self, modality: str, where: Any, order: tuple[str, str] | None,
                descending: bool, offset: int, limit: int) -> list[int]: ...
    def keyword(self, modality: str, text: str, where: Any,
                limit: int) -> tuple[np.ndarray, np.ndarray]: ...  # BM25 (ids, scores)
    def items(self, ids: Sequence[int]) -> list[Any]: ...
    def vectors(self, modality: str, ids: Sequence[int]) -> np.ndarray: ...
    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, int]: ...  # live images by path
    def close(self) -> None: ...


@dataclass(frozen=True)
class Hit:
    id: int
    score: float | None  # None in a listing (`Searcher.browse`), which ranks nothing
    item: Any  # an ItemRecord, or None when the metadata row is gone
    vector_rank: int | None = None  # 1-based ranks behind a keyword or hybrid score
    keyword_rank: int | None = None
    relevance: float | None = None  # calibrated P(true match), when the model has a fit
    duplicates: tuple[int, ...] = ()  # near-duplicates folded into this hit (Query.dedup)


@dataclass(frozen=True)
class Page:
    hits: list[Hit]
    after: tuple[float, int] | None  # (score, id) of the last hit, for the next page
    served: int  # hits served so far, this page included


@dataclass(frozen=True)
class Result:
    """One page of answers to a Query."""

    hits: list[Hit]
    generation: str
    next_cursor: str | None  # None: the last page
    took_ms: float


def _float32(vector: Sequence[float] | np.ndarray) -> np.ndarray:
    """(d,) float32; a value past float32's range becomes inf (quietly: normalise refuses it)."""
    with np.errstate(over="ignore"):
        return np.asarray(vector, dtype=np.float32).reshape(-1)


def normalise(vector: np.ndarray) -> Vector:
    """A finite (d,) vector scaled to unit length; raise InvalidQueryError for a zero one."""
    wide = _float32(vector).astype(np.float64)  # float32 squares and norms could overflow
    norm = float(np.linalg.norm(wide))
    if not np.isfinite(norm) or norm < 1e-6:
        raise InvalidQueryError("the query vector has zero length (or is not finite); "
                                "give non-zero weights to terms that do not cancel out")
    return (wide / norm).astype(np.float32)


def combine(weighted: Sequence[tuple[float, np.ndarray]]) -> Vector:
    """Sum of weight * unit vector over the terms, then normalised: +0.7 dog +0.3 img -0.5 people."""
    if not weighted:
        raise InvalidQueryError("a multi-query needs at least one term")
    total = sum(weight * normalise(vector) for weight, vector in weighted)
    return normalise(total)


def zero_shot_probabilities(image_emb: Vector, label_emb: np.ndarray, scale: float) -> np.ndarray:
    """(d,) image, (n_labels, d) prompts -> (n_labels,) softmax(scale * cosine)."""
    logits = scale * (label_emb @ image_emb)  # (n_labels,)
    logits = logits - logits.max()
    weights = np.exp(logits)
    return (weights / weights.sum()).astype(np.float32)


class Searcher:
    """Answers queries against one generation; `encoder` turns texts and images into
    embeddings (None: vector and item queries only)."""

    def __init__(self, generation: GenerationLike, encoder: QueryEncoder | None = None,
                 max_depth: int = MAX_DEPTH):
        if encoder is not None and encoder.embed_dim != generation.embed_dim:
            raise IndexMismatchError(
                f"model embed_dim {encoder.embed_dim} does not match the index's "
                f"{generation.embed_dim}; serve the index with the model that built it")
        built = generation.model_sha256
        loaded = encoder.model_sha256 if encoder is not None else None
        if built and loaded and built != loaded:  # same size, other weights: answers nonsense
            raise IndexMismatchError(mismatch_note(built, loaded))
        self.generation, self.encoder, self.max_depth = generation, encoder, max_depth

    @property
    def embed_dim(self) -> int:
        return int(self.generation.embed_dim)

    # --- whole queries ---
    def search(self, query: Query) -> Result:
        """One page of `query`'s hits, continuing from `query.cursor` when given."""
        started = time.perf_counter()
        where = self.parsed_filter(query.filter)  # a bad filter fails before anything runs
        within = None if where is None else self.generation.matching_ids(query.target, where)
        vector = None if query.mode == "keyword" else self.query_vector(query.terms)
        fingerprint, name = query.fingerprint(), self.generation.name
        after, served = None, 0
        if query.cursor:
            cursor = decode_cursor(query.cursor, name, fingerprint, self.max_depth)
            after, served = cursor.after, cursor.served
        if served + query.k > self.max_depth:
            raise TooDeepError(f"paging stops at {self.max_depth} hits; narrow the query or "
                               "raise the threshold")
        if query.order_by is not None:
            page = self.dated(query, vector, within, served)
        elif vector is not None and query.mode == "vector":
            page = self.refined(query, vector, self.page(
                query.target, vector, query.k, query.threshold, after, served, within))
        else:
            ranked = self.keyword_hits(query, vector, where, within, served + query.k + SLACK)
            page = self.refined(query, vector, cut_page(ranked, query.k, after, served))
        token = (encode_cursor(Cursor(name, fingerprint, page.after, page.served))
                 if page.after is not None else None)
        return Result(page.hits, name, token, round((time.perf_counter() - started) * 1000, 3))

    def dated(self, query: Query, vector: Vector | None, within: np.ndarray | None,
              served: int) -> Page:
        """A page of the relevant hits in date order (retrieval/search/dates.py): the same
        candidates on every page, so paging by position is stable."""
        dates.check_date_field(str(query.order_by), self.generation.fields())
        assert vector is not None  # vector mode: Query checks it
        best = self.page(query.target, vector, query.candidates, query.threshold, None, 0,
                         within)
        relevant = self.refined(query, vector, best).hits
        ordered = dates.in_date_order(relevant, str(query.order_by), query.descending)
        hits = ordered[served:served + query.k]
        more = served + len(hits) < len(ordered)
        return Page(hits, (hits[-1].score, hits[-1].id) if more else None, served + len(hits))

    def refined(self, query: Query, vector: Vector | None, page: Page) -> Page:
        """Relevance (and the min_relevance cut) when the model has a calibration for this
        query's direction; near-duplicates collapsed when asked. See retrieval/search/refine.py."""
        hits, ended = page.hits, False
        fit = self.calibration_for(query)
        if query.min_relevance is not None and fit is None:
            raise InvalidQueryError("min_relevance needs a model with a relevance calibration "
                                    "for this kind of query (text to image or image to text); "
                                    "use threshold instead")
        if fit is not None and vector is not None and query.mode == "vector":
            ranked = lambda n: self.generation.search(query.target, vector[None, :], n)[0][0]
            hits, ended = refine.with_relevance(hits, fit, ranked, query.min_relevance)
        if query.dedup and hits:
            hits = refine.collapsed(hits, self.generation.vectors(query.target,
                                                                 [hit.id for hit in hits]))
        return Page(hits, None if ended else page.after, page.served)

    def calibration_for(self, query: Query) -> Calibration | None:
        """The encoder's model's fit for this query's direction (None: raw scores only)."""
        modality = query.query_modality()
        if self.encoder is None or modality is None or modality == query.target:
            return None
        return self.encoder.calibrations.get(f"{modality}_to_{query.target}")

    def keyword_hits(self, query: Query, vector: Vector | None, where: Filter | None,
               within: np.ndarray | None, depth: int) -> list[Hit]:
        """The hits of a keyword (BM25) or hybrid (RRF of BM25 and vector) query, best first,
        at least `depth` deep (hybrid: the fixed HYBRID_DEPTH of each ranking, fused)."""
        target, text = query.target, query.keyword_text()
        if vector is None:
            ids, scores = self.generation.keyword(target, text, where, depth)
            records = self.generation.items(ids.tolist()) if len(ids) else []
            ranked = enumerate(zip(ids, scores, records), start=1)
            return [Hit(int(i), float(score), record, keyword_rank=rank)
                    for rank, (i, score, record) in ranked]
        keyword_ids, _ = self.generation.keyword(target, text, where, HYBRID_DEPTH)
        vector_hits = self.nearest(target, vector[None, :], HYBRID_DEPTH, None, within)[0]
        fused = fuse([hit.id for hit in vector_hits], keyword_ids.tolist())
        records = self.generation.items([hit.id for hit in fused]) if fused else []
        return [Hit(hit.id, hit.score, record, hit.vector_rank, hit.keyword_rank)
                for hit, record in zip(fused, records)]

    def browse(self, listing: Listing) -> Result:
        """One page of the items a filter matches, newest first or by a field; no query."""
        started, name = time.perf_counter(), self.generation.name
        fields = self.generation.fields()
        where = None if listing.filter is None else parse_filter(listing.filter, fields)
        order = None
        if listing.order_by is not None:
            if listing.order_by not in fields:
                raise FilterError(f"order_by: unknown field {listing.order_by!r}; this index's "
                                  f"fields are {', '.join(sorted(fields)) or 'none'}",
                                  listing.order_by)
            order = (listing.order_by, fields[listing.order_by])
        served = 0
        if listing.cursor:  # a generation never changes, so an offset into it is stable
            served = decode_cursor(listing.cursor, name, listing.fingerprint(),
                                   self.max_depth).served
        if served + listing.k > self.max_depth:
            raise TooDeepError(f"listing stops at {self.max_depth} items; narrow the filter")
        ids = self.generation.listing(listing.target, where, order, listing.descending, served,
                                      listing.k)
        hits = [Hit(i, None, record) for i, record in zip(ids, self.generation.items(ids))]
        token = (encode_cursor(Cursor(name, listing.fingerprint(), (0.0, ids[-1]),
                                      served + len(ids))) if len(ids) == listing.k else None)
        return Result(hits, name, token, round((time.perf_counter() - started) * 1000, 3))

    def caption(self, image: ImageLike, k: int = 5,
                filter: dict[str, Any] | None = None) -> list[Hit]:
        """The indexed texts that best match an image (among those `filter` matches):
        captioning by retrieval."""
        within = self.matching("text", filter)
        return self.nearest("text", self._encoder().images([image]), k, within=within)[0]

    def matching(self, target: str, filter: dict[str, Any] | None) -> np.ndarray | None:
        """The ascending live ids of `target` that a filter (JSON) matches; None without one."""
        where = self.parsed_filter(filter)
        return None if where is None else self.generation.matching_ids(target, where)

    def parsed_filter(self, filter: dict[str, Any] | None) -> Filter | None:
        """A filter (JSON) checked against the generation's fields; FilterError, before any
        search runs, when they refuse it."""
        return None if filter is None else parse_filter(filter, self.generation.fields())

    def classify(self, image: ImageLike, labels: Sequence[str],
                 template: str = ZERO_SHOT_TEMPLATE) -> list[tuple[str, float]]:
        """Zero-shot: (label, probability) pairs, most probable first."""
        encoder = self._encoder()
        image_emb = encoder.images([image])[0]
        label_emb = encoder.texts([template.format(label) for label in labels])
        probabilities = zero_shot_probabilities(image_emb, label_emb, encoder.logit_scale)
        return sorted(zip(labels, probabilities.tolist()), key=lambda pair: -pair[1])

    def item(self, item_id: int) -> Any:
        """An indexed item's record; UnknownItemError when it is not live."""
        record = self.generation.items([item_id])[0]
        if record is None:
            raise UnknownItemError(f"no item {item_id} in generation {self.generation.name}; "
                                   "ids come from search hits")
        return record

    def image_file(self, item_id: int) -> tuple[Path, str]:
        """(file, media type) of an image item, or of the image a caption belongs to; only a
        file under the index's media roots that is an image by its header is ever given."""
        record = self.item(item_id)
        if record.modality != "image":
            if record.image_id is None:
                raise UnknownItemError(f"item {item_id} is a text with no image")
            record = self.item(record.image_id)
        if record.path is None:  # imported from embeddings made elsewhere, without the file
            raise UnknownItemError(f"image item {record.id} has no file in this index; its "
                                   "metadata may name where it came from (url)")
        found = self.generation.image_file(record.path)
        if found is None:
            raise UnknownItemError(f"the image file of item {item_id} is not served: it is no "
                                   "longer on disk, not an image, or outside the folders "
                                   "this index was built from")
        return found

    # --- the parts ---
    def query_vector(self, terms: Sequence[Term]) -> Vector:
        """The unit query of weighted terms; texts and images are encoded in one call each."""
        texts = [term.text for term in terms if term.text is not None]
        images = [term.image for term in terms if term.image is not None]
        text_vectors = iter(self._encoder().texts(texts) if texts else ())
        image_vectors = iter(self._encoder().images(images) if images else ())
        weighted = []
        for term in terms:
            if term.text is not None:
                vector = next(text_vectors)
            elif term.image is not None:
                vector = next(image_vectors)
            elif term.item_id is not None:
                vector = self.item_vector(term.item_id)
            else:
                vector = self.check_vector(term.vector or ())
            weighted.append((term.weight, vector))
        if len(weighted) == 1 and weighted[0][0] == 1.0:
            return normalise(weighted[0][1])
        return combine(weighted)

    def check_vector(self, vector: Sequence[float] | np.ndarray) -> Vector:
        vector = _float32(vector)
        if vector.shape[0] != self.embed_dim:
            raise InvalidQueryError(f"the vector has {vector.shape[0]} dimensions; this index "
                                    f"has {self.embed_dim}")
        return normalise(vector)

    def item_vector(self, item_id: int) -> Vector:
        """The stored embedding of an indexed item (to search "more like this")."""
        record = self.item(item_id)
        return normalise(self.generation.vectors(record.modality, [item_id])[0])

    def nearest(self, target: str, queries: np.ndarray, k: int, threshold: float | None = None,
                within: np.ndarray | None = None) -> list[list[Hit]]:
        """(nq, d) unit queries -> per query up to k hits in `target` modality, best first
        (only among the ids `within`, when given: min(k, len(within)) of them)."""
        if target not in MODALITIES:
            raise InvalidQueryError(f"target must be one of {MODALITIES}, got {target!r}")
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.embed_dim)
        available = self.generation.count(target) if within is None else len(within)
        if available == 0 or k < 1:
            return [[] for _ in range(len(queries))]
        if within is None:
            scores, ids = self.generation.search(target, queries, k)  # (nq, k2) each
        else:
            scores, ids = self.generation.search(target, queries, k, within=within)
        return [self._hits(row_scores, row_ids, threshold)
                for row_scores, row_ids in zip(scores, ids)]

    def _hits(self, scores: np.ndarray, ids: np.ndarray, threshold: float | None) -> list[Hit]:
        keep = [(float(score), int(item_id)) for score, item_id in zip(scores, ids)
                if item_id >= 0 and (threshold is None or score >= threshold)]
        # Equal scores are ordered by id so pages cut in the same place every time.
        keep.sort(key=lambda pair: (-pair[0], pair[1]))
        records = self.generation.items([item_id for _, item_id in keep]) if keep else []
        return [Hit(item_id, score, record) for (score, item_id), record in zip(keep, records)]

    def page(self, target: str, query: Vector, k: int, threshold: float | None = None,
             after: tuple[float, int] | None = None, served: int = 0,
             within: np.ndarray | None = None, slack: int = SLACK) -> Page:
        """One page of k hits after the (score, id) of the previous page's last hit.

        Keyset paging survives tiny float differences between re-encodings of the same query,
        which offsets would turn into duplicated or skipped hits.
        """
        depth = served + k + (slack if after is not None else 0)
        hits = self.nearest(target, query[None, :], depth, threshold, within)[0]
        return cut_page(hits, k, after, served)

    def _encoder(self) -> QueryEncoder:
        if self.encoder is None:
            raise InvalidQueryError("this searcher has no model: pass vectors, not texts "
                                    "or images")
        return self.encoder

    # --- convenience for notebooks ---
    def text_to_images(self, text: str, k: int = 10) -> list[Hit]:
        return self.search(Query.text(text, k=k)).hits

    def image_to_texts(self, image: ImageLike, k: int = 10) -> list[Hit]:
        return self.search(Query.image(image, target="text", k=k)).hits


def cut_page(hits: list[Hit], k: int, after: tuple[float, int] | None, served: int) -> Page:
    """The k hits (sorted by (-score, id)) after the (score, id) of the previous page's last."""
    if after is not None:
        last_score, last_id = after
        hits = [hit for hit in hits if (-hit.score, hit.id) > (-last_score, last_id)]
    hits = hits[:k]
    last = (hits[-1].score, hits[-1].id) if hits else after
    return Page(hits, last if len(hits) == k else None, served + len(hits))
