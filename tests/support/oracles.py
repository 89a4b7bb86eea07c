"""Shared test data for the core's tests: seeded synthetic embeddings."""

from __future__ import annotations

import numpy as np


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
