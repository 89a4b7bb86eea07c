"""Search restricted to the items a filter matches (`within`: their ids, ascending), exactly
when few match and through the FAISS index with an id selector otherwise.

Post-filtering after an ANN search returns fewer than k hits, or none; here the selector runs
inside FAISS, its search parameters (efSearch, nprobe) scaled by the filter's selectivity and
widened until every query has min(k, matches) hits; a query still short at the widest setting
is answered exactly. So a filter that at least k live items match always gets k hits.

Crossover (exact below it), measured with `python -m bench.filtered_crossover --count 100000
--dim 512` (seeded synthetic unit vectors, k = 10, one query per call, one FAISS thread, ms
per query on 2 CPU cores shared with other jobs, so the figures are noisy):

    matches           500    2,000   5,000   10,000   20,000   50,000
    exact scan        0.4    1.8     4.3     8.0      19.3     47.1
    HNSW + selector   55.7   42.5    26.5    12.9     7.6      4.0
    exact scan        0.2    1.2     2.9     5.6      14.3     33.4
    IVF-PQ + selector 1.6    1.7     1.0     1.0      0.8      0.8

The exact scan costs about the number of matches; the index's cost falls as more items match
(its parameters stretch by 1 / selectivity) and, at a given number of matches, rises with the
index's size, so these counts are a floor for bigger indexes.

An HNSW generation also keeps a reduced copy of its vectors (`retrieval.store.reduced`),
which answers every filter up to REDUCED_SCAN floats of matches. Measured at 1,000,000
CLIP-like vectors (`bench/filtered.py`'s data; 32 components, re-rank 50; one query per call,
queries/s of this module alone):

    matches              2,000   5,000   50,000   100,000   200,000
    reduced copy         8,927   2,972   374      191       106
    exact scan           258     117
    HNSW + selector                      ~93 *    81        108
    (* the efSearch that reaches recall 0.95; 1 / sqrt(selectivity) gives 63/s at 0.98)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from retrieval.ann import engines as ann
from retrieval.ann.rowscan import gather_rows, rows_of
from retrieval.store.reduced import Reduced

# Matching items below which an exact scan of their stored vectors beats the index (per kind;
# a flat index is always exact: a full scan is what it would do anyway, and the gathered one
# uses BLAS where FAISS's selector path does not).
EXACT_BELOW = {"flat": math.inf, "hnsw": 12_000, "ivfpq": 3_000, ann.DISK_KIND: 3_000}
MAX_EF_SEARCH = 4096
WIDEN = 4  # each retry multiplies efSearch / nprobe by this
EXACT_CHUNK = 65_536  # stored rows scored per block, bounding an exact pass's memory
# A generation with a reduced copy (`retrieval.store.reduced`) scans it for any filter whose
# matches' reduced vectors hold at most REDUCED_SCAN floats; the index takes over above. Fewer
# matches than its re-rank depth are all scored exactly, without the page release that slows
# `exact_within`.
REDUCED_SCAN = 6_400_000


@dataclass(frozen=True)
class Stored:
    """A modality as stored: its index and spec, ascending ids (n,), vectors (n, d)."""

    index: faiss.Index
    kind: str
    params: dict[str, Any]
    ids: np.ndarray
    vectors: np.ndarray
    live: int
    reduced: Reduced | None = None


def search_within(stored: Stored, queries: np.ndarray, k: int,
                  within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nq, d) unit queries -> (scores, ids) each (nq, min(k, len(within))), best first,
    among the ids in `within` only (live ids, ascending)."""
    width = min(int(k), len(within))
    if width == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    reduced = stored.reduced
    if reduced is not None and len(within) * len(reduced.components) <= REDUCED_SCAN:
        scores, rows = reduced.search(stored.vectors, queries, width, rows_of(stored.ids, within))
        return scores, stored.ids[rows]
    if len(within) < EXACT_BELOW[stored.kind]:
        return exact_within(stored, queries, width, within)
    return _indexed(stored, queries, width, within)


def exact_within(stored: Stored, queries: np.ndarray, k: int,
                 within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k among `within`, in blocks of EXACT_CHUNK stored rows; ties by id."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    rows = rows_of(stored.ids, within)
    for start in range(0, len(within), EXACT_CHUNK):
        part = rows[start:start + EXACT_CHUNK]
        vectors = gather_rows(stored.vectors, part)  # (m, d)
        scores = _products(queries, vectors)  # (nq, m)
        ids = np.broadcast_to(within[start:start + EXACT_CHUNK], scores.shape)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, ids], axis=1)
        best_scores, best_ids = _top(best_scores, best_ids, k)
    return best_scores, best_ids


def _products(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(nq, d) x (m, d) -> (nq, m) inner products. A few queries skip BLAS: its threads' start
    costs more than the product itself on busy cores (5,000 x 512 for one query: 11-18 ms
    through BLAS, 1.5-2.8 ms through einsum, on the 2 shared cores the crossover was measured
    on)."""
    if len(queries) <= 4:
        return np.einsum("qd,md->qm", queries, vectors)
    return queries @ vectors.T


def _top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best by (-score, id)."""
    if scores.shape[1] > k:
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
    order = np.lexsort((ids, -scores), axis=1) if scores.size else np.zeros_like(ids)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _indexed(stored: Stored, queries: np.ndarray, k: int,
             within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bitmap = _bitmap(within)
    selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    selectivity = len(within) / max(stored.live, 1)
    lookup = ann.sorted_lookup(stored.ids, stored.vectors)
    params = _scaled(stored, selectivity)
    scores = np.zeros((len(queries), k), np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    todo = np.arange(len(queries))
    while len(todo):
        search_params = ann.search_parameters(stored.kind, params, selector)
        found_scores, found_ids = ann.search(stored.index, queries[todo], k, params, lookup,
                                             search_params)
        scores[todo], ids[todo] = found_scores, found_ids
        todo = todo[(found_ids < 0).any(axis=1)]
        wider = _widened(stored, params)
        if wider is None:
            break
        params = wider
    if len(todo):  # short even at the widest setting: exact over the matches
        scores[todo], ids[todo] = exact_within(stored, queries[todo], k, within)
    del selector  # the bitmap outlives the selector that points into it
    return scores, ids


def _bitmap(within: np.ndarray) -> np.ndarray:
    """Bit i set for each id i in `within` (FAISS's IDSelectorBitmap order: little-endian)."""
    mask = np.zeros(int(within[-1]) + 1, bool)
    mask[within] = True
    return np.packbits(mask, bitorder="little")


def _scaled(stored: Stored, selectivity: float) -> dict[str, Any]:
    """The index's tuned parameters stretched for a selector that skips the non-matching
    neighbours an unfiltered search would have counted: IVF's nprobe by 1 / selectivity (a
    list holds that share of matches), HNSW's efSearch by 1 / sqrt(selectivity). The graph
    walk still passes through non-matching nodes, so its candidate list fills with matches
    faster than the share suggests: at 200,000 vectors, 1 / sqrt kept recall@10 at 0.97-0.98
    from 50 % down to 1 % and answered 1.2-2.8x more queries/s than 1 / selectivity
    (`bench/filtered.py`). A page still short is widened by `_widened`."""
    params = dict(stored.params)
    selectivity = max(selectivity, 1e-9)
    if stored.kind == "hnsw":
        params["efSearch"] = min(MAX_EF_SEARCH,
                                 math.ceil(params["efSearch"] / math.sqrt(selectivity)))
    elif stored.kind in ("ivfpq", ann.DISK_KIND):
        params["nprobe"] = min(int(params["nlist"]), math.ceil(params["nprobe"] / selectivity))
    return params


def _widened(stored: Stored, params: dict[str, Any]) -> dict[str, Any] | None:
    """The next, wider setting, or None when the index is already searched as widely as it
    goes (then the short queries are answered exactly)."""
    if stored.kind == "hnsw" and params["efSearch"] < MAX_EF_SEARCH:
        return {**params, "efSearch": min(MAX_EF_SEARCH, params["efSearch"] * WIDEN)}
    if stored.kind in ("ivfpq", ann.DISK_KIND) and params["nprobe"] < params["nlist"]:
        return {**params, "nprobe": min(int(params["nlist"]), params["nprobe"] * WIDEN)}
    return None
