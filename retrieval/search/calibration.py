"""A relevance users can trust: the probability that a hit is a true match, from its score and
the query's own score statistics.

A raw cosine means different things for different queries (a vague caption scores every photo
lower than a precise one) and different models, so one cosine cutoff cuts some queries' true
matches and lets other queries' noise through. Each hit here is described by its score `s`,
its gap to the query's best score, and the query's spread (best minus K-th score); a logistic
regression on those, fitted on a validation split where the true matches are known, gives
`relevance` in [0, 1]. The fit is stored in the model card per direction (text->image and
image->text), and a model without one keeps raw scores only. This module applies a fit;
fitting one is training's (retrieval/training/calibration.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SPREAD_RANK = 10  # the query's spread is its best score minus its SPREAD_RANK-th
DIRECTIONS = ("text_to_image", "image_to_text")


@dataclass(frozen=True)
class Calibration:
    """Logistic regression over (score, gap to the query's best, the query's spread)."""

    coef: tuple[float, float, float]
    intercept: float
    spread_rank: int = SPREAD_RANK

    def relevance(self, scores: np.ndarray, ranked: np.ndarray) -> np.ndarray:
        """(n,) hit scores -> (n,) probabilities; `ranked` are the query's best scores in
        descending order (at least one; SPREAD_RANK of them for the full spread)."""
        return self.relevance_of_rows(hit_features(np.asarray(scores, np.float64),
                                                   np.asarray(ranked, np.float64),
                                                   self.spread_rank))

    def relevance_of_rows(self, features: np.ndarray) -> np.ndarray:
        """Probabilities for rows of `hit_features` already computed."""
        return 1.0 / (1.0 + np.exp(-(features @ np.asarray(self.coef) + self.intercept)))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(tuple(float(c) for c in data["coef"]), float(data["intercept"]),  # type: ignore[arg-type]
                   int(data.get("spread_rank", SPREAD_RANK)))


def hit_features(scores: np.ndarray, ranked: np.ndarray, spread_rank: int) -> np.ndarray:
    """(n, 3): score, score minus the best, and the best minus the spread_rank-th score."""
    best = ranked[0]
    spread = best - ranked[min(spread_rank, len(ranked)) - 1]
    return np.stack([scores, scores - best, np.full_like(scores, spread)], axis=1)


def calibration_of(card: dict[str, Any], direction: str) -> Calibration | None:
    """The calibration a model card holds for a direction, or None."""
    fitted = (card.get("calibration") or {}).get(direction)
    return Calibration.from_dict(fitted) if fitted else None
