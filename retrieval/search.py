"""Query an index generation with a model: text, image, vector and weighted multi-queries,
zero-shot classification and paging. No web framework here: usable from a notebook.

The generation is anything with the interface of `retrieval.store.Generation`
(`count`, `search`, `items`, `vectors`, `embed_dim`, `name`); encoding is left to the caller
when it batches requests itself (the API), or done here with `retrieval.encode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from retrieval.cursor import query_fingerprint  # noqa: F401 - re-exported
from retrieval.encode import encode_image_batch, encode_texts
from retrieval.errors import IndexMismatchError, InvalidQueryError, UnknownItemError
from retrieval.model import ClipModel

MODALITIES = ("image", "text")
ZERO_SHOT_TEMPLATE = "a photo of a {}."
Vector = np.ndarray  # (d,) float32, L2-normalised


class GenerationLike(Protocol):
    name: str
    embed_dim: int
    root: Path | None  # the index directory (stored relative paths resolve against it)

    def count(self, modality: str) -> int: ...
    def search(self, modality: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def items(self, ids: Sequence[int]) -> list[Any]: ...
    def vectors(self, modality: str, ids: Sequence[int]) -> np.ndarray: ...


@dataclass(frozen=True)
class Hit:
    id: int
    score: float
    item: Any  # an ItemRecord, or None when the metadata row is gone


@dataclass(frozen=True)
class Page:
    hits: list[Hit]
    after: tuple[float, int] | None  # (score, id) of the last hit, for the next page
    served: int  # hits served so far, this page included


def _float32(vector: Sequence[float] | np.ndarray) -> np.ndarray:
    """(d,) float32; a value past float32's range becomes inf (quietly: normalise refuses it)."""
    with np.errstate(over="ignore"):
        return np.asarray(vector, dtype=np.float32).reshape(-1)


def normalise(vector: np.ndarray) -> Vector:
    """A finite (d,) vector scaled to unit length; raise InvalidQueryError for a zero one."""
    wide = _float32(vector).astype(np.float64)  # float32 squares and norms could overflow
    norm = float(np.linalg.norm(wide))
    if not np.isfinite(norm) or norm < 1e-6:
        raise InvalidQueryError("the query vector has zero length (or is not finite); "
                         "give non-zero weights to terms that do not cancel out")
    return (wide / norm).astype(np.float32)


def combine(weighted: Sequence[tuple[float, np.ndarray]]) -> Vector:
    """Sum of weight * unit vector over the terms, then normalised: +0.7 dog +0.3 img -0.5 people."""
    if not weighted:
        raise InvalidQueryError("a multi-query needs at least one term")
    total = sum(weight * normalise(vector) for weight, vector in weighted)
    return normalise(total)


class Searcher:
    """Answers queries against one generation with one model (their embed_dim must match)."""

    def __init__(self, clip: ClipModel | None, generation: GenerationLike):
        if clip is not None and clip.embed_dim != generation.embed_dim:
            raise IndexMismatchError(
                f"model embed_dim {clip.embed_dim} does not match the index's "
                f"{generation.embed_dim}; serve the index with the model that built it")
        self.clip, self.generation = clip, generation

    @property
    def embed_dim(self) -> int:
        return int(self.generation.embed_dim)

    # --- encoding (the service batches these itself) ---
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) texts -> (n, d)."""
        return encode_texts(self._model(), list(texts))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n,) RGB images -> (n, d)."""
        clip = self._model()
        if not images:
            return np.zeros((0, clip.embed_dim), dtype=np.float32)
        pixels = torch.stack([clip.preprocess(image) for image in images])  # (n, 3, H, W)
        return encode_image_batch(clip, pixels)

    def _model(self) -> ClipModel:
        if self.clip is None:
            raise InvalidQueryError("this searcher has no model: pass vectors, not texts "
                                    "or images")
        return self.clip

    # --- searching ---
    def check_vector(self, vector: Sequence[float] | np.ndarray) -> Vector:
        vector = _float32(vector)
        if vector.shape[0] != self.embed_dim:
            raise InvalidQueryError(f"the vector has {vector.shape[0]} dimensions; this index "
                                    f"has {self.embed_dim}")
        return normalise(vector)

    def search(self, target: str, queries: np.ndarray, k: int,
               threshold: float | None = None) -> list[list[Hit]]:
        """(nq, d) unit queries -> per query up to k hits in `target` modality, best first."""
        if target not in MODALITIES:
            raise InvalidQueryError(f"target must be one of {MODALITIES}, got {target!r}")
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.embed_dim)
        if self.generation.count(target) == 0 or k < 1:
            return [[] for _ in range(len(queries))]
        scores, ids = self.generation.search(target, queries, k)  # (nq, k2) each
        return [self._hits(row_scores, row_ids, threshold)
                for row_scores, row_ids in zip(scores, ids)]

    def _hits(self, scores: np.ndarray, ids: np.ndarray, threshold: float | None) -> list[Hit]:
        keep = [(float(score), int(item_id)) for score, item_id in zip(scores, ids)
                if item_id >= 0 and (threshold is None or score >= threshold)]
        # Equal scores are ordered by id so pages cut in the same place every time.
        keep.sort(key=lambda pair: (-pair[0], pair[1]))
        records = self.generation.items([item_id for _, item_id in keep]) if keep else []
        return [Hit(item_id, score, record) for (score, item_id), record in zip(keep, records)]

    def page(self, target: str, query: Vector, k: int, threshold: float | None = None,
             after: tuple[float, int] | None = None, served: int = 0, slack: int = 16) -> Page:
        """One page of k hits after the (score, id) of the previous page's last hit.

        Keyset paging survives tiny float differences between re-encodings of the same query,
        which offsets would turn into duplicated or skipped hits.
        """
        depth = served + k + (slack if after is not None else 0)
        hits = self.search(target, query[None, :], depth, threshold)[0]
        if after is not None:
            last_score, last_id = after
            hits = [hit for hit in hits if (-hit.score, hit.id) > (-last_score, last_id)]
        hits = hits[:k]
        last = (hits[-1].score, hits[-1].id) if hits else after
        return Page(hits, last if len(hits) == k else None, served + len(hits))

    def item_vector(self, item_id: int) -> Vector:
        """The stored embedding of an indexed item (to search "more like this")."""
        record = self.generation.items([item_id])[0]
        if record is None:
            raise UnknownItemError(f"no item with id {item_id} in generation "
                                   f"{self.generation.name}")
        return normalise(self.generation.vectors(record.modality, [item_id])[0])

    # --- convenience for notebooks ---
    def text_to_images(self, text: str, k: int = 10) -> list[Hit]:
        return self.search("image", self.encode_texts([text]), k)[0]

    def image_to_texts(self, image: Image.Image, k: int = 10) -> list[Hit]:
        return self.search("text", self.encode_images([image]), k)[0]

    def classify(self, image: Image.Image, labels: Sequence[str]) -> dict[str, float]:
        image_emb = self.encode_images([image])[0]
        label_emb = self.encode_texts([ZERO_SHOT_TEMPLATE.format(label) for label in labels])
        return dict(zip(labels, zero_shot_probabilities(image_emb, label_emb,
                                                        self.logit_scale()).tolist()))

    def logit_scale(self) -> float:
        return logit_scale(self._model())


def logit_scale(clip: ClipModel) -> float:
    """exp of the model's learnt log-scale (100 for OpenAI CLIP), capped like training does."""
    raw = getattr(clip.model, "logit_scale", None)
    value = float(raw.detach().float().exp().item()) if raw is not None else 100.0
    return min(value, 100.0)


def zero_shot_probabilities(image_emb: Vector, label_emb: np.ndarray, scale: float) -> np.ndarray:
    """(d,) image, (n_labels, d) prompts -> (n_labels,) softmax(scale * cosine)."""
    logits = scale * (label_emb @ image_emb)  # (n_labels,)
    logits = logits - logits.max()
    weights = np.exp(logits)
    return (weights / weights.sum()).astype(np.float32)
