"""Evaluate a model on a manifest: Recall@K both ways and zero-shot classification."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retrieval.inputs.captions import Item, Manifest, Skipped
from retrieval.models.clip import ClipModel
from retrieval.models.files import encode_image_files
from retrieval.models.inference import encode_images, encode_texts
from retrieval.training.metrics import retrieval_metrics, zero_shot_accuracy

TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "an image showing a {}.",
)


@dataclass
class ManifestEmbeddings:
    """Embeddings of a manifest's decodable images and of their captions."""

    image_emb: np.ndarray  # (n_images, d)
    text_emb: np.ndarray  # (n_texts, d)
    text_to_image: np.ndarray  # (n_texts,) row in image_emb of each caption's image
    labels: list[str | None]  # (n_images,)
    problems: list[Skipped] = field(default_factory=list)


def embed_manifest(clip: ClipModel, manifest: Manifest, batch_size: int = 64,
                   workers: int | None = None) -> ManifestEmbeddings:
    paths = [item.image for item in manifest.items]
    image_emb, kept, problems = encode_image_files(clip, paths, batch_size, workers)
    items = [manifest.items[i] for i in kept]
    texts = [caption for item in items for caption in item.captions]
    text_to_image = np.asarray([row for row, item in enumerate(items) for _ in item.captions],
                               dtype=np.int64)
    return ManifestEmbeddings(
        image_emb=image_emb, text_emb=encode_texts(clip, texts),
        text_to_image=text_to_image, labels=[item.label for item in items],
        problems=list(manifest.problems) + problems,
    )


def class_embeddings(clip: ClipModel, classnames: list[str],
                     templates: tuple[str, ...] = TEMPLATES) -> np.ndarray:
    """(n_classes, d): the normalised mean of each class's prompt embeddings."""
    prompts = [template.format(name) for name in classnames for template in templates]
    emb = encode_texts(clip, prompts).reshape(len(classnames), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def evaluate_embeddings(clip: ClipModel, emb: ManifestEmbeddings) -> dict[str, float]:
    results: dict[str, float] = {"images": len(emb.image_emb), "texts": len(emb.text_emb),
                                 "skipped": len(emb.problems)}
    if len(emb.text_emb) and len(emb.image_emb):
        results.update(retrieval_metrics(emb.image_emb, emb.text_emb, emb.text_to_image))
    labelled = [i for i, label in enumerate(emb.labels) if label is not None]
    if labelled:
        classnames = sorted({emb.labels[i] for i in labelled})
        index = {name: n for n, name in enumerate(classnames)}
        targets = np.asarray([index[emb.labels[i]] for i in labelled])
        results.update(zero_shot_accuracy(emb.image_emb[labelled],
                                          class_embeddings(clip, classnames), targets))
    return results


def evaluate(clip: ClipModel, manifest: Manifest, batch_size: int = 64,
             workers: int | None = None) -> tuple[dict[str, float], list[Skipped]]:
    emb = embed_manifest(clip, manifest, batch_size, workers)
    return evaluate_embeddings(clip, emb), emb.problems


def rank_images(clip: ClipModel, corpus: Manifest, query: str, k: int = 5
                ) -> list[tuple[float, Item]]:
    """Brute-force text->image ranking of a small corpus (the index does this at scale)."""
    image_emb = encode_images(clip, [item.image for item in corpus.items])  # (n, d)
    scores = image_emb @ encode_texts(clip, [query])[0]  # (n,)
    order = np.argsort(-scores)[:k]
    return [(float(scores[i]), corpus.items[i]) for i in order]
