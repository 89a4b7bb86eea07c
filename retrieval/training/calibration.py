"""Fitting the relevance calibration that `retrieval.search.calibration` applies: a logistic
regression on a validation split whose true matches are known, per direction, stored in the
model card beside the weights (which it leaves untouched, so the fingerprint stays).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.search.calibration import (
    DIRECTIONS,
    SPREAD_RANK,
    Calibration,
    hit_features,
)

FIT_DEPTH = 50  # each validation query contributes its FIT_DEPTH best candidates


def training_rows(queries: np.ndarray, candidates: np.ndarray,
                  matches: Sequence[set[int]], depth: int = FIT_DEPTH,
                  spread_rank: int = SPREAD_RANK) -> tuple[np.ndarray, np.ndarray]:
    """Features (m, 3) and labels (m,) of each query's `depth` best candidates; `matches[q]`
    holds the candidate rows that truly match query q."""
    features, labels = [], []
    for start in range(0, len(queries), 512):
        scores = queries[start:start + 512] @ candidates.T  # (b, n)
        top = np.argsort(-scores, axis=1)[:, :depth]
        for row, order in enumerate(top):
            ranked = scores[row, order].astype(np.float64)
            features.append(hit_features(ranked, ranked, spread_rank))
            labels.append(np.isin(order, list(matches[start + row])))
    return np.concatenate(features), np.concatenate(labels).astype(np.int64)


def fit(features: np.ndarray, labels: np.ndarray) -> Calibration:
    """Logistic regression (scikit-learn, lightly regularised) on `training_rows`."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=10.0, max_iter=1000).fit(features, labels)
    return Calibration(tuple(float(c) for c in model.coef_[0]),  # type: ignore[arg-type]
                       float(model.intercept_[0]))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by size."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(labels[inside].mean() - probabilities[inside].mean())
    return float(error)


def precision_recall(chosen: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Precision and recall of a boolean selection against the true matches."""
    hits = int((chosen & (labels == 1)).sum())
    return hits / max(int(chosen.sum()), 1), hits / max(int((labels == 1).sum()), 1)


def best_cutoff(scores: np.ndarray, labels: np.ndarray) -> float:
    """The single cutoff with the best F1 (for cosines: the baseline a calibration must
    beat)."""
    grid = np.quantile(scores, np.linspace(0.5, 0.999, 200))
    f1 = [2 * p * r / max(p + r, 1e-12)
          for p, r in (precision_recall(scores >= cut, labels) for cut in grid)]
    return float(grid[int(np.argmax(f1))])


def calibrate(image_emb: np.ndarray, text_emb: np.ndarray,
              text_to_image: np.ndarray) -> tuple[dict[str, Calibration], dict[str, Any]]:
    """Fit both directions on a validation set (images (n, d), captions (m, d), each caption's
    image row) and report, per direction, how well a fit on half of the images does on the
    other half: expected calibration error, precision and recall at relevance >= 0.5, the
    same for the best single cosine cutoff chosen on the first half (by F1), and for the best
    relevance cutoff chosen the same way (like for like: relevance ranks pairs across
    queries, a cosine does not)."""
    fitted, report = {}, {}
    halves = [np.arange(len(image_emb)) % 2 == side for side in (0, 1)]
    for direction in DIRECTIONS:
        rows = [_direction_rows(direction, image_emb, text_emb, text_to_image, half)
                for half in halves]
        first, second = rows
        held_out = fit(*first)
        probabilities = held_out.relevance_of_rows(second[0])
        cutoff = best_cutoff(first[0][:, 0], first[1])
        relevance_cut = best_cutoff(held_out.relevance_of_rows(first[0]), first[1])
        calibrated = precision_recall(probabilities >= 0.5, second[1])
        fixed = precision_recall(second[0][:, 0] >= cutoff, second[1])
        tuned = precision_recall(probabilities >= relevance_cut, second[1])
        report[direction] = {
            "ece": round(expected_calibration_error(probabilities, second[1]), 4),
            "precision_at_0.5": round(calibrated[0], 4), "recall_at_0.5": round(calibrated[1], 4),
            "fixed_cutoff": round(cutoff, 4), "fixed_precision": round(fixed[0], 4),
            "fixed_recall": round(fixed[1], 4), "best_f1_relevance": round(relevance_cut, 4),
            "its_precision": round(tuned[0], 4), "its_recall": round(tuned[1], 4),
            "pairs": len(second[1])}
        features = np.concatenate([first[0], second[0]])
        fitted[direction] = fit(features, np.concatenate([first[1], second[1]]))
    return fitted, report


def _direction_rows(direction: str, image_emb: np.ndarray, text_emb: np.ndarray,
                    text_to_image: np.ndarray, images: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Training rows among the images in `images` (a boolean mask) and their captions."""
    kept = np.flatnonzero(images)
    new_row = {int(old): new for new, old in enumerate(kept)}
    captions = np.flatnonzero(np.isin(text_to_image, kept))
    owner = np.array([new_row[int(text_to_image[c])] for c in captions])
    if direction == "text_to_image":
        matches = [{int(row)} for row in owner]
        return training_rows(text_emb[captions], image_emb[kept], matches)
    by_image: list[set[int]] = [set() for _ in kept]
    for caption_row, image_row in enumerate(owner):
        by_image[image_row].add(caption_row)
    return training_rows(image_emb[kept], text_emb[captions], by_image)


def store_in_card(weights: Path, fitted: dict[str, Calibration], report: dict[str, Any],
                  fitted_on: str) -> Path:
    """Write the fit (and its held-out report) into the checkpoint's model card; returns the
    card's path. The weights are untouched, so the model's fingerprint stays the same."""
    from retrieval.atomic import write_json_atomic
    from retrieval.models.card import card_path, read_card

    card = read_card(weights)
    card["calibration"] = {**{d: c.as_dict() for d, c in fitted.items()},
                           "fitted_on": fitted_on, "held_out": report}
    path = card_path(weights)
    write_json_atomic(path, card)
    return path
