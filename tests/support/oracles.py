"""Exact answers to check the core against: seeded synthetic embeddings, and an index
generation held in numpy arrays and searched by brute force."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.store import ItemRecord


def modality_gap_data(count: int, queries: int, dim: int = 32, seed: int = 0):
    """Images = normalise(c + g), captions = normalise(c + noise - g): paired concepts `c` and a
    shared gap vector `g`, like CLIP's two clouds. Returns (image vectors, caption queries)."""
    rng = np.random.default_rng(seed)
    concepts = rng.normal(size=(count, dim)).astype(np.float32)
    gap = rng.normal(size=dim).astype(np.float32)
    gap *= 1.5 / np.linalg.norm(gap)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    images = unit(concepts + gap)
    picked = rng.choice(count, queries, replace=False)
    noise = rng.normal(scale=0.3, size=(queries, dim)).astype(np.float32)
    captions = unit(concepts[picked] + noise - gap)
    return images, captions


class InMemoryGeneration:
    """retrieval.search.searcher.GenerationLike over numpy arrays, searched exactly: what a
    Searcher over a real generation should answer. No metadata fields and no keyword index."""

    def __init__(self, name: str, embed_dim: int, records: Sequence[ItemRecord],
                 vectors: dict[str, np.ndarray], root: Path | None = None):
        self.name, self.embed_dim, self.root = name, embed_dim, root
        self.manifest: dict[str, Any] = {"name": name}
        self.model_sha256 = None
        self.closed = False
        self._records = {record.id: record for record in records}
        self._ids = {modality: np.array([r.id for r in records if r.modality == modality],
                                        dtype=np.int64) for modality in ("image", "text")}
        self._vectors = vectors  # modality -> (n, d) rows in the order of self._ids

    def count(self, modality: str) -> int:
        return len(self._ids[modality])

    def search(self, modality: str, queries: np.ndarray, k: int,
               within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(nq, d) queries -> (nq, k) scores and ids, best first, ties by position."""
        assert not self.closed, "searched a closed generation"
        rows = np.arange(self.count(modality))
        if within is not None:
            rows = rows[np.isin(self._ids[modality], within)]
        k = min(k, len(rows))
        scores = queries @ self._vectors[modality][rows].T  # (nq, n)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(scores, order, 1).astype(np.float32),
                self._ids[modality][rows][order])

    def items(self, ids: Sequence[int]) -> list[ItemRecord | None]:
        return [self._records.get(int(item_id)) for item_id in ids]

    def vectors(self, modality: str, ids: Sequence[int]) -> np.ndarray:
        rows = [int(np.flatnonzero(self._ids[modality] == item_id)[0]) for item_id in ids]
        return self._vectors[modality][rows]

    def fields(self) -> dict[str, str]:
        return {}  # no metadata fields: every filter names its field unknown

    def matching_ids(self, modality: str, where: Any) -> np.ndarray:
        raise AssertionError("no filter can pass an empty field list")

    def listing(self, modality: str, where: Any, order: Any, descending: bool, offset: int,
                limit: int) -> list[int]:
        ids = sorted(self._ids[modality].tolist(), reverse=descending)
        return ids[offset:offset + limit]

    def keyword(self, modality: str, text: str, where: Any, limit: int) -> Any:
        from retrieval.errors import InvalidQueryError
        raise InvalidQueryError("this in-memory generation has no keyword index")

    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, int]:
        wanted = set(paths)
        return {r.path: r.id for r in self._records.values() if r.path in wanted}

    def close(self) -> None:
        self.closed = True
