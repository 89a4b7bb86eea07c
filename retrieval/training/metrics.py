"""Retrieval and zero-shot metrics on L2-normalised embeddings (n, d) float32.

Recall@K follows the CLIP papers (and CLIP_benchmark): a text query hits when its own image
is in the top K; an image query hits when any of its captions is in the top K.
"""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (1, 5, 10)


def first_positive_ranks(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """0-based rank of the best-scoring positive for each query row.

    scores: (nq, nc); positives: (nq, nc) bool with at least one True per row.
    Rank = how many candidates score strictly higher than the best positive.
    """
    best_positive = np.where(positives, scores, -np.inf).max(axis=1, keepdims=True)
    return (scores > best_positive).sum(axis=1)


def _summary(ranks: np.ndarray, ks: tuple[int, ...], prefix: str) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float((ranks < k).mean() * 100) for k in ks}
    out[f"{prefix}_mean_rank"] = float(ranks.mean() + 1)
    out[f"{prefix}_median_rank"] = float(np.median(ranks) + 1)
    return out


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                      ks: tuple[int, ...] = DEFAULT_KS, chunk: int = 2048) -> dict[str, float]:
    """Recall@K (in %), mean and median rank, text->image ("t2i") and image->text ("i2t").

    image_emb: (n_images, d); text_emb: (n_texts, d); text_to_image: (n_texts,) image index.
    """
    text_to_image = np.asarray(text_to_image)
    t2i = []
    for start in range(0, len(text_emb), chunk):
        scores = text_emb[start:start + chunk] @ image_emb.T  # (chunk, n_images)
        own = text_to_image[start:start + chunk]
        positives = np.zeros_like(scores, dtype=bool)
        positives[np.arange(len(own)), own] = True
        t2i.append(first_positive_ranks(scores, positives))
    i2t = []
    for start in range(0, len(image_emb), chunk):
        scores = image_emb[start:start + chunk] @ text_emb.T  # (chunk, n_texts)
        rows = np.arange(start, start + len(scores))
        positives = text_to_image[None, :] == rows[:, None]
        i2t.append(first_positive_ranks(scores, positives))
    return {**_summary(np.concatenate(t2i), ks, "t2i"), **_summary(np.concatenate(i2t), ks, "i2t")}


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                       ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-K accuracy (in %) of classifying images by their nearest class embedding.

    class_emb: (n_classes, d), one row per class (prompt templates already averaged).
    """
    scores = image_emb @ class_emb.T  # (n_images, n_classes)
    positives = np.zeros_like(scores, dtype=bool)
    positives[np.arange(len(labels)), labels] = True
    ranks = first_positive_ranks(scores, positives)
    return {f"zeroshot_top{k}": float((ranks < k).mean() * 100) for k in ks
            if k <= class_emb.shape[0]}
