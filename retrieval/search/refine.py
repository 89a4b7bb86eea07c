"""What a page of hits gets after ranking: the calibrated relevance of each hit (and the cut
at `min_relevance`), and near-duplicates collapsed into the best-scoring hit of each group.

Relevance needs the query's own best scores (retrieval.search.calibration): they come from one more
search of calibration.SPREAD_RANK hits, over the whole index as in the fit, whatever the
filter. Collapsing reads the page's stored vectors; it works within a page, so a page can hold
fewer than k hits, each saying which hits it stands for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from retrieval.search.calibration import SPREAD_RANK, Calibration
from retrieval.search.dedup import DEFAULT_THRESHOLD, collapse

Ranked = Callable[[int], np.ndarray]  # n -> the query's best n scores, descending


def with_relevance(hits: Sequence[Any], calibration: Calibration, ranked: Ranked,
                   min_relevance: float | None) -> tuple[list[Any], bool]:
    """Hits with `relevance` set, cut where it falls below `min_relevance`; returns them and
    whether the cut removed any (then the list ends here: relevance falls with the score)."""
    if not hits:
        return list(hits), False
    best = ranked(SPREAD_RANK)
    scores = np.array([hit.score for hit in hits], dtype=np.float64)
    relevance = calibration.relevance(scores, best)
    kept = [replace(hit, relevance=round(float(value), 4))
            for hit, value in zip(hits, relevance)
            if min_relevance is None or value >= min_relevance]
    return kept, len(kept) < len(hits)


def collapsed(hits: Sequence[Any], vectors: np.ndarray,
              threshold: float = DEFAULT_THRESHOLD) -> list[Any]:
    """The page's hits with near-duplicates folded into the best-scoring one of each group
    (`vectors` (n, d): the hits' stored embeddings, in hit order)."""
    by_id = {hit.id: hit for hit in hits}
    groups = collapse([hit.id for hit in hits], vectors, threshold)
    return [replace(by_id[kept], duplicates=tuple(others)) for kept, others in groups]
