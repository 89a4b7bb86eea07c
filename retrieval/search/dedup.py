"""Near-duplicates: groups of items whose embeddings are nearly the same (burst shots, resized
or re-encoded copies), and collapsing them in a ranked list.

Pairs are found exactly over the stored vectors, a block of rows at a time (the cost is
n^2 d / 2 multiply-adds, a few seconds at 20,000 x 512 on two cores); above
EXACT_MAX_ITEMS each item asks the index for its nearest few instead, which finds the same
pairs within the index's recall. Pairs join into groups by union-find, so a chain of close
shots is one group even when its two ends are further apart than the threshold.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from retrieval.ann.rowscan import rows_of
from retrieval.errors import InvalidQueryError

DEFAULT_THRESHOLD = 0.95  # cosine; re-encoded or resized copies of a photo score above 0.97
EXACT_MAX_ITEMS = 20_000
NEIGHBOURS = 16  # per item, when the index proposes the pairs
BLOCK_ROWS = 2048


@dataclass(frozen=True)
class DuplicateGroup:
    """Items that are near-duplicates of each other: `keep` (the lowest id, the first one
    indexed) and the others with their cosine to it."""

    keep: int
    others: tuple[tuple[int, float], ...]  # (id, cosine to `keep`), closest first

    @property
    def ids(self) -> list[int]:
        return [self.keep] + [item for item, _ in self.others]


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise InvalidQueryError(f"a duplicate threshold is a cosine in (0, 1], got {threshold}")
    return float(threshold)


def exact_pairs(vectors: np.ndarray, threshold: float,
                block: int = BLOCK_ROWS) -> Iterator[tuple[int, int]]:
    """Row pairs (i < j) of (n, d) unit vectors with cosine >= threshold, block by block."""
    for start in range(0, len(vectors), block):
        rows = np.asarray(vectors[start:start + block], dtype=np.float32)  # (b, d)
        scores = rows @ np.asarray(vectors[start:], dtype=np.float32).T  # (b, n - start)
        left, right = np.nonzero(scores >= threshold)
        for i, j in zip(left.tolist(), right.tolist()):
            if start + i < start + j:
                yield start + i, start + j


def groups_from_pairs(ids: np.ndarray, vectors: np.ndarray,
                      pairs: Iterator[tuple[int, int]]) -> list[DuplicateGroup]:
    """Union-find over row pairs; each group is kept by its lowest id, the others ranked by
    their cosine to it. Groups come out largest first, then by id."""
    parent = {}

    def root(row: int) -> int:
        while parent.get(row, row) != row:
            parent[row] = parent.get(parent[row], parent[row])
            row = parent[row]
        return row

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for row in list(parent):
        members.setdefault(root(row), []).append(row)
    groups = []
    for rows in members.values():
        rows = sorted(set(rows) | {root(rows[0])}, key=lambda r: int(ids[r]))
        keep = rows[0]
        cosines = np.asarray(vectors[rows[1:]], np.float32) @ np.asarray(vectors[keep],
                                                                          np.float32)
        others = sorted(zip((int(ids[r]) for r in rows[1:]), cosines.tolist()),
                        key=lambda pair: (-pair[1], pair[0]))
        groups.append(DuplicateGroup(int(ids[keep]),
                                     tuple((item, round(c, 4)) for item, c in others)))
    return sorted(groups, key=lambda g: (-len(g.others), g.keep))


def collapse(ids: Sequence[int], vectors: np.ndarray,
             threshold: float) -> list[tuple[int, list[int]]]:
    """Walk ranked hits best first and keep a hit unless it is a near-duplicate of one kept
    before it; returns (kept id, the ids it stands for) in rank order. `vectors` (n, d) are
    the hits' stored embeddings, row-aligned with `ids`."""
    kept: list[tuple[int, list[int]]] = []
    kept_rows: list[int] = []
    vectors = np.asarray(vectors, dtype=np.float32)
    for row, item in enumerate(ids):
        if kept_rows:
            cosines = vectors[kept_rows] @ vectors[row]
            best = int(np.argmax(cosines))
            if cosines[best] >= threshold:
                kept[best][1].append(int(item))
                continue
        kept.append((int(item), []))
        kept_rows.append(row)
    return kept


class _Stored(Protocol):
    """What `find_duplicates` needs of a generation (retrieval.store.Generation has it)."""

    def all_vectors(self, modality: str, live_only: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]: ...

    def search(self, modality: str, queries: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]: ...


def find_duplicates(generation: _Stored, modality: str = "image",
                    threshold: float = DEFAULT_THRESHOLD) -> list[DuplicateGroup]:
    """Groups of live items of one modality whose cosine is >= threshold: exact below
    EXACT_MAX_ITEMS items, else from each item's NEIGHBOURS nearest in the index."""
    threshold = check_threshold(threshold)
    ids, vectors = generation.all_vectors(modality)  # ascending ids, (n, d)
    if len(ids) <= EXACT_MAX_ITEMS:
        pairs = exact_pairs(vectors, threshold)
    else:
        pairs = _index_pairs(generation, modality, ids, vectors, threshold)
    return groups_from_pairs(ids, vectors, pairs)


def _index_pairs(generation: _Stored, modality: str, ids: np.ndarray, vectors: np.ndarray,
                 threshold: float) -> Iterator[tuple[int, int]]:
    for start in range(0, len(ids), BLOCK_ROWS):
        queries = np.asarray(vectors[start:start + BLOCK_ROWS], dtype=np.float32)
        scores, found = generation.search(modality, queries, NEIGHBOURS)  # (b, k) each
        rows = rows_of(ids, found)
        for i, j in zip(*np.nonzero((scores >= threshold) & (ids[rows] == found))):
            a, b = start + int(i), int(rows[i, j])
            if a != b:
                yield min(a, b), max(a, b)
