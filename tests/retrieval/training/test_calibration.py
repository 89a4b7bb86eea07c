"""Relevance calibration: fitted on a validation set where the true matches are known, it
turns scores into probabilities that hold on held-out queries, and beats one fixed cosine
cutoff when queries differ in how sharply they score."""

from __future__ import annotations

import json

import numpy as np

from retrieval.search import calibration
from retrieval.training import calibration as fitting


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def validation_set(images: int = 400, dim: int = 32, seed: int = 0):
    """Images and 5 captions each; a caption's noise varies (precise or vague captions), so
    their true matches score anywhere from high to middling."""
    rng = np.random.default_rng(seed)
    image_emb = unit(rng.normal(size=(images, dim)))
    owners = np.repeat(np.arange(images), 5)
    noise = rng.uniform(0.3, 1.6, size=(len(owners), 1))
    text_emb = unit(image_emb[owners] + noise * unit(rng.normal(size=(len(owners), dim))))
    return image_emb, text_emb, owners


def test_held_out_relevance_is_calibrated_and_beats_a_fixed_cutoff():
    fitted, report = fitting.calibrate(*validation_set())
    assert set(fitted) == set(calibration.DIRECTIONS)
    for direction in calibration.DIRECTIONS:
        figures = report[direction]
        assert figures["ece"] < 0.05, figures
        f1 = 2 * figures["precision_at_0.5"] * figures["recall_at_0.5"] / (
            figures["precision_at_0.5"] + figures["recall_at_0.5"])
        fixed = 2 * figures["fixed_precision"] * figures["fixed_recall"] / (
            figures["fixed_precision"] + figures["fixed_recall"])
        assert f1 >= fixed - 0.02, figures


def test_relevance_grows_with_the_score_and_reads_back_from_a_card(tmp_path):
    fitted, _ = fitting.calibrate(*validation_set())
    fit = fitted["text_to_image"]
    ranked = np.array([0.8, 0.5, 0.45, 0.4, 0.38, 0.35, 0.3, 0.3, 0.29, 0.28])
    relevance = fit.relevance(ranked, ranked)
    assert np.all(np.diff(relevance) <= 1e-12) and 0 <= relevance.min() <= relevance.max() <= 1
    card = json.loads(json.dumps({"calibration": {d: c.as_dict() for d, c in fitted.items()}}))
    assert calibration.calibration_of(card, "text_to_image") == fit
    assert calibration.calibration_of({}, "text_to_image") is None


def test_expected_calibration_error_of_perfect_and_of_overconfident_predictions():
    labels = np.array([1] * 30 + [0] * 70)
    honest = np.full(100, 0.3)
    assert fitting.expected_calibration_error(honest, labels) < 1e-9
    assert fitting.expected_calibration_error(np.full(100, 0.9), labels) > 0.5
