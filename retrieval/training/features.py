"""What one training step feeds the model: cached frozen features, or raw inputs streamed.

A locked part of a tower is run once per image or caption and cached (towers.py gives the
split); each step then runs only the trainable top. A tower that trains as a whole (an
unlocked image trunk on a GPU, or an open_clip text transformer) gets its raw inputs each
step instead: pixels decoded by DataLoader workers in step order, or tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from retrieval.errors import ManifestError
from retrieval.inputs.captions import Manifest, Skipped
from retrieval.models.clip import ClipModel
from retrieval.models.files import ImageBatch, encode_image_files, iter_image_batches
from retrieval.models.inference import autocast_for, encode_texts, text_forward
from retrieval.models.text import trim_padding
from retrieval.progress import ProgressFactory, no_progress
from retrieval.training.config import TrainConfig
from retrieval.training.metrics import retrieval_metrics
from retrieval.training.towers import Split, split_image_tower, split_text_tower


def image_split(clip: ClipModel, config: TrainConfig) -> Split | None:
    """The cached/trainable split of the image tower; None when it trains whole (streamed)."""
    if not config.lock_image:
        return None
    split = split_image_tower(clip, config.unlocked_image_stages)
    if split is None:  # a locked tower that is not a timm trunk: cache its embeddings (LiT)
        return Split(frozen=clip.model.encode_image, trainable=lambda features: features,
                     modules=[])
    return split


def text_split(clip: ClipModel, config: TrainConfig) -> Split | None:
    """The split of an HF text tower; None for open_clip's own text transformer (streamed)."""
    return split_text_tower(clip, config.unlocked_text_layers)


@dataclass
class Features:
    """One manifest ready for training: cached features where the towers are split."""

    paths: list[Path]  # (n_images,) the images used
    image: torch.Tensor | None  # (n_images, ...) cached frozen image features, or None
    texts: list[str]  # (n_texts,)
    text_hidden: list[torch.Tensor] | None  # per caption (length, width), or None
    text_to_image: np.ndarray  # (n_texts,) image row of each caption
    captions_of: list[list[int]]  # per image: its caption rows
    image_views: list[torch.Tensor] = field(default_factory=list)  # augmented views, as image


def _cache_key(clip: ClipModel, paths: list[Path], unlocked_stages: int, view: int) -> str:
    payload = [clip.arch, clip.init, clip.config.get("preprocess_cfg"), unlocked_stages,
               [str(path) for path in paths]] + ([view] if view else [])
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:20]


def view_transform(clip: ClipModel, view: int) -> Callable:
    """The preprocessing of cached view `view`: 0 is the model's own, 1 its mirror image,
    2 and up a random resized crop (scale 0.5-1) that is mirrored half the time."""
    from torchvision import transforms

    if view == 0:
        return clip.preprocess
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    cfg = clip.config.get("preprocess_cfg", {})
    tail = [transforms.ToTensor(), transforms.Normalize(cfg.get("mean", (0.5,) * 3),
                                                        cfg.get("std", (0.5,) * 3))]
    bicubic = transforms.InterpolationMode.BICUBIC
    if view == 1:
        return transforms.Compose([transforms.RandomHorizontalFlip(p=1.0), clip.preprocess])
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=bicubic),
        transforms.RandomHorizontalFlip(), *tail])


def _cache_images(clip: ClipModel, split: Split, paths: list[Path], config: TrainConfig,
                  label: str, view: int = 0, progress: ProgressFactory = no_progress
                  ) -> tuple[torch.Tensor, list[int], list[Skipped]]:
    """Frozen features of every decodable image, from the disk cache when it has them."""
    folder = None
    if config.cache_dir:
        key = _cache_key(clip, paths, config.unlocked_image_stages, view)
        folder = Path(config.cache_dir) / f"image-features-{key}"
        if (folder / "kept.npy").exists():
            problems = [Skipped(**row) for row in json.loads((folder / "problems.json").read_text())]
            return (torch.from_numpy(np.load(folder / "features.npy")),
                    np.load(folder / "kept.npy").tolist(), problems)
    chunks, kept, problems = [], [], []
    bar = progress(f"image features {label} view {view}", len(paths))
    torch.manual_seed(config.seed * 100 + view)  # the random crops' seeds, via the workers'
    for batch in iter_image_batches(paths, view_transform(clip, view), 64, config.workers):
        if batch.indices:
            pixels = batch.pixels.to(clip.device)
            if clip.channels_last:  # the tower is NHWC (see load_model)
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast_for(clip.device, config.precision):
                features = split.frozen(pixels)
            # feature maps are large: fp16 halves the cache; pooled vectors stay fp32
            chunks.append(features.to(torch.float16 if features.ndim > 2 else torch.float32).cpu())
            kept.extend(batch.indices)
        problems.extend(problem for _, problem in batch.problems)
        bar.update(len(batch.indices) + len(batch.problems))
    bar.close()
    features = torch.cat(chunks) if chunks else torch.empty(0)
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "features.npy", features.numpy())
        (folder / "problems.json").write_text(json.dumps([asdict(p) for p in problems]))
        np.save(folder / "kept.npy", np.asarray(kept, dtype=np.int64))  # last: marks complete
    return features, kept, problems


def _cache_texts(clip: ClipModel, split: Split, texts: list[str],
                 progress: ProgressFactory = no_progress) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    bar = progress("text features", len(texts))
    for start in range(0, len(texts), 256):
        bar.update(len(texts[start:start + 256]))
        tokens = trim_padding(clip.tokenizer(texts[start:start + 256]), clip.pad_token_id)
        with torch.inference_mode():
            hidden, mask = split.frozen(tokens.to(clip.device))
        lengths = mask.sum(dim=1).tolist()
        out.extend(h[:n].to(torch.float16).cpu() for h, n in zip(hidden, lengths))
    bar.close()
    return out


def prepare_features(clip: ClipModel, manifest: Manifest, config: TrainConfig,
                     views: int = 1, progress: ProgressFactory = no_progress
                     ) -> tuple[Features, list[Skipped]]:
    """Cache what the splits allow, with `views` - 1 augmented views of each image (see
    `view_transform`); keep paths and texts for what is streamed."""
    paths = [item.image for item in manifest.items]
    problems: list[Skipped] = []
    split = image_split(clip, config)
    image, image_views = None, []
    kept = list(range(len(paths)))
    if split is not None:
        image, kept, problems = _cache_images(clip, split, paths, config, manifest.source.name,
                                              progress=progress)
        for view in range(1, views):
            extra, extra_kept, _ = _cache_images(clip, split, paths, config,
                                                 manifest.source.name, view, progress)
            image_views.append(_align(extra, extra_kept, kept))
    items = [manifest.items[i] for i in kept]
    texts, text_to_image, captions_of = [], [], []
    for row, item in enumerate(items):
        captions_of.append(list(range(len(texts), len(texts) + len(item.captions))))
        texts.extend(item.captions)
        text_to_image.extend([row] * len(item.captions))
    splitter = text_split(clip, config)
    hidden = _cache_texts(clip, splitter, texts, progress) if splitter is not None else None
    features = Features([item.image for item in items], image, texts, hidden,
                        np.asarray(text_to_image, dtype=np.int64), captions_of, image_views)
    return features, problems


def _align(features: torch.Tensor, kept: list[int], wanted: list[int]) -> torch.Tensor:
    """Rows of a view's features for the images view 0 kept (decoding is deterministic, so
    the same images fail; this only guards against a view that lost more)."""
    if kept == wanted:
        return features
    row_of = {index: row for row, index in enumerate(kept)}
    missing = [i for i in wanted if i not in row_of]
    if missing:
        raise ManifestError(f"{len(missing)} images decoded for view 0 but not for another view")
    return features[[row_of[i] for i in wanted]]


def pad_hidden(hidden: list[torch.Tensor], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length cached hidden states into (n, L, w) plus an (n, L) mask."""
    length = max(h.shape[0] for h in hidden)
    batch = torch.zeros(len(hidden), length, hidden[0].shape[1])
    mask = torch.zeros(len(hidden), length, dtype=torch.long)
    for row, h in enumerate(hidden):
        batch[row, :h.shape[0]] = h.float()
        mask[row, :h.shape[0]] = 1
    return batch.to(device), mask.to(device)


def embed_images(clip: ClipModel, config: TrainConfig, feats: Features, rows: list[int],
                 pixels: torch.Tensor | None = None,
                 views: list[int] | None = None) -> torch.Tensor:
    """(len(rows), d) normalised: the trainable top on cached features (view `views[i]` of
    row i; default view 0), or the whole tower on `pixels`."""
    split = image_split(clip, config)
    if split is None:
        return F.normalize(clip.model.encode_image(pixels.to(clip.device)).float(), dim=-1)
    if views is None or not feats.image_views:
        cached = feats.image[rows]
    else:
        sources = [feats.image, *feats.image_views]
        cached = torch.stack([sources[view][row] for row, view in zip(rows, views)])
    cached = cached.to(clip.device, torch.float32)
    return F.normalize(split.trainable(cached).float(), dim=-1)


def embed_texts(clip: ClipModel, config: TrainConfig, feats: Features,
                rows: list[int]) -> torch.Tensor:
    split = text_split(clip, config)
    if split is None:
        tokens = clip.tokenizer([feats.texts[r] for r in rows])
        return F.normalize(text_forward(clip, tokens).float(), dim=-1)
    hidden = [feats.text_hidden[r] for r in rows]
    return F.normalize(split.trainable(*pad_hidden(hidden, clip.device)).float(), dim=-1)


def evaluate_features(clip: ClipModel, config: TrainConfig, feats: Features) -> dict[str, float]:
    """Validation Recall@K with the current weights (cached parts are reused)."""
    clip.model.eval()
    with torch.inference_mode():
        if feats.image is not None:
            image_emb = torch.cat([embed_images(clip, config, feats, rows)
                                   for rows in _chunks(len(feats.image))]).cpu().numpy()
        else:
            image_emb, kept, _ = encode_image_files(clip, feats.paths, workers=config.workers)
            if len(kept) != len(feats.paths):  # drop captions of images that failed to decode
                return _metrics_for_kept(image_emb, kept, clip, config, feats)
        text_emb = _all_texts(clip, config, feats)
    return retrieval_metrics(image_emb, text_emb, feats.text_to_image)


def _all_texts(clip: ClipModel, config: TrainConfig, feats: Features) -> np.ndarray:
    if feats.text_hidden is None:
        return encode_texts(clip, feats.texts)
    return torch.cat([embed_texts(clip, config, feats, rows)
                      for rows in _chunks(len(feats.texts))]).cpu().numpy()


def _chunks(count: int, size: int = 512) -> list[list[int]]:
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def _metrics_for_kept(image_emb: np.ndarray, kept: np.ndarray, clip: ClipModel,
                      config: TrainConfig, feats: Features) -> dict[str, float]:
    new_row = {int(old): new for new, old in enumerate(kept)}
    text_rows = [t for t, image in enumerate(feats.text_to_image) if int(image) in new_row]
    text_emb = _all_texts(clip, config, feats)[text_rows]
    mapping = np.asarray([new_row[int(feats.text_to_image[t])] for t in text_rows])
    return retrieval_metrics(image_emb, text_emb, mapping)


def step_batches(clip: ClipModel, config: TrainConfig, feats: Features, order: list[int]
                 ) -> Iterator[tuple[list[int], torch.Tensor | None, list[Skipped]]]:
    """(image rows, pixels or None, problems) per micro-batch, in `order`.

    Streamed pixels come from DataLoader workers that decode ahead of the model; images
    that fail to decode drop out of their batch and come back as problems.
    """
    size = config.batch_size
    if feats.image is not None:
        for start in range(0, len(order) - size + 1, size):
            yield order[start:start + size], None, []
        return
    train_transform = open_clip.image_transform(
        clip.model.visual.image_size, is_train=True,
        mean=clip.config.get("preprocess_cfg", {}).get("mean"),
        std=clip.config.get("preprocess_cfg", {}).get("std"))
    full = order[:len(order) - len(order) % size]
    paths = [feats.paths[row] for row in full]
    batch: ImageBatch
    for batch in iter_image_batches(paths, train_transform, size, config.workers,
                                    pin_memory=clip.device.type == "cuda"):
        rows = [full[index] for index in batch.indices]  # indices count from the epoch start
        yield rows, batch.pixels, [problem for _, problem in batch.problems]
