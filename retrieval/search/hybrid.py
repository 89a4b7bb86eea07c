"""Keyword and hybrid ranking: BM25 from the generation's keyword index, and reciprocal rank
fusion (RRF, Cormack et al. 2009) of the BM25 and vector rankings.

    fused score = sum over rankings of 1 / (RRF_K + rank)    (rank from 1; absent: no term)

Each ranking is cut at HYBRID_DEPTH candidates, a fixed depth, so every page of a hybrid
query is cut from the same fused list (its pages neither repeat nor skip); ties are broken
by id, so fusion is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MODES = ("vector", "keyword", "hybrid")
RRF_K = 60
HYBRID_DEPTH = 200  # candidates taken from each ranking


@dataclass(frozen=True)
class Fused:
    id: int
    score: float  # the RRF score
    vector_rank: int | None  # 1-based rank in the vector ranking, None when not in it
    keyword_rank: int | None


def fuse(vector_ids: Sequence[int], keyword_ids: Sequence[int], k: int = RRF_K) -> list[Fused]:
    """Both rankings (best first) fused by RRF, best first, ties by id."""
    ranks: dict[int, list[int | None]] = {}
    for rank, item_id in enumerate(vector_ids, start=1):
        ranks.setdefault(int(item_id), [None, None])[0] = rank
    for rank, item_id in enumerate(keyword_ids, start=1):
        ranks.setdefault(int(item_id), [None, None])[1] = rank
    fused = [Fused(item_id, sum(1.0 / (k + r) for r in pair if r is not None), pair[0], pair[1])
             for item_id, pair in ranks.items()]
    fused.sort(key=lambda hit: (-hit.score, hit.id))
    return fused
