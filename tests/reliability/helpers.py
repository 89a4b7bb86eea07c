"""Small synthetic generations for the reliability suites: 8-dim unit vectors, Flat indexes,
a fake model identity, so no encoder is needed to exercise the real store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.models.identity import ModelIdentity
from retrieval.store import ItemRecord, StoreOptions, write_generation

DIM = 8
MODEL = ModelIdentity(sha256="f" * 64, arch="fake-8", embed_dim=DIM)
FLAT = StoreOptions(index_kind="flat")


def unit_vectors(count: int, seed: int) -> np.ndarray:
    """(count, DIM) float32 L2-normalised rows."""
    rows = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def small_generation(root: Path, images: int = 6, texts: int = 6, seed: int = 0,
                     options: StoreOptions = FLAT) -> str:
    """Images 1..images, texts after them; returns the generation's name."""
    records = [ItemRecord(i, "image", path=f"/photos/{i}.png") for i in range(1, images + 1)]
    records += [ItemRecord(images + 1 + i, "text", text=f"caption {i}") for i in range(texts)]
    vectors = {"image": unit_vectors(images, seed), "text": unit_vectors(texts, seed + 1)}
    return write_generation(root, MODEL, records, vectors, options)
