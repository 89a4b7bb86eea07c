"""Decode and preprocess images in DataLoader workers while the model encodes the last batch.
Images are files or members of tar archives (webdataset shards, `TarMember`).

Bad files never stop the loop: a worker turns them into a Skipped that travels with the
batch, so the caller can skip and report them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.errors import BadImageError
from retrieval.inputs.captions import Skipped
from retrieval.inputs.images import DEFAULT_MAX_PIXELS, DecodeLimits, draft_side_of, load_image
from retrieval.inputs.tensors import split_tensor_tail
from retrieval.models.clip import ClipModel
from retrieval.models.inference import encode_image_batch


@dataclass(frozen=True)
class TarMember:
    """An image inside a tar archive (a webdataset shard), read by its byte range: listing a
    shard records where each image is, and decoding reads exactly those bytes, so nothing is
    extracted to disk and a worker on another machine needs only the archive."""

    archive: Path
    name: str  # the member's name in the archive
    offset: int  # where its data starts in the archive
    size: int  # bytes

    @property
    def path(self) -> Path:
        """How the item is stored and reported: the archive's path, then the member's name."""
        return self.archive / self.name

    def __str__(self) -> str:
        return str(self.path)

    def read(self) -> bytes:
        if self.size == 0:
            raise BadImageError(f"{self.path}: empty file")
        with open(self.archive, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) < self.size:
            raise BadImageError(f"{self.path}: truncated (the archive ends {self.size - len(data)} "
                                "bytes early)")
        return data


ImageFile = Path | TarMember  # what the indexer decodes: a file, or an image inside a tar


def decode_image(source: ImageFile, transform: Callable, limits: DecodeLimits
                 ) -> tuple[torch.Tensor | None, str | None]:
    """(transform(decoded image), None), or (None, the reason) for a file that cannot be
    decoded: the one decoding step of the indexer's DataLoader workers and its Ray tasks."""
    try:
        if isinstance(source, TarMember):
            image = load_image(source.read(), limits=limits, name=str(source))
        else:
            image = load_image(source, limits=limits)
        return transform(image), None
    except BadImageError as error:
        return None, str(error)
    except Exception as error:  # noqa: BLE001 - any preprocess failure must not kill the worker
        return None, f"{source}: {type(error).__name__}: {error}"


def decode_limits(preprocess: Callable, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodeLimits:
    """The limits images are decoded within for a model's `preprocess`."""
    return DecodeLimits(max_pixels=max_pixels, draft_side=draft_side_of(preprocess))


@dataclass
class ImageBatch:
    indices: list[int]  # positions in the input sequence of the decoded images
    pixels: torch.Tensor  # (len(indices), 3, H, W): float, or uint8 when asked for
    problems: list[tuple[int, Skipped]]  # inputs of this batch that could not be decoded


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[ImageFile], preprocess: Callable, limits: DecodeLimits):
        self.paths, self.preprocess, self.limits = list(paths), preprocess, limits

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        return index, *decode_image(self.paths[index], self.preprocess, self.limits)


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch:
    good = [(index, pixels) for index, pixels, _ in samples if pixels is not None]
    problems = [(index, Skipped(str(index), reason)) for index, pixels, reason in samples
                if pixels is None]
    pixels = torch.stack([p for _, p in good]) if good else torch.empty(0)
    return ImageBatch(indices=[i for i, _ in good], pixels=pixels, problems=problems)


# How far decode workers step back when they share the CPU with the encoder. A parallel
# encoder (ONNX Runtime's or torch's intra-op pool) waits for its slowest thread at every
# op, so a decode process holding one of its cores stalls all of them; at the lowest
# priority decoding runs ahead into the prefetch queue in the encoder's gaps and between
# batches instead (end-to-end 0.70 -> 0.74 of encode-only on 2 cores, bench/indexing.py).
DECODE_NICENESS = 19


def decode_niceness(clip: ClipModel) -> int:
    """DECODE_NICENESS when `clip` encodes on the CPU the decode workers share, else 0."""
    return DECODE_NICENESS if clip.device.type == "cpu" else 0


def _step_back(niceness: int, _worker: int) -> None:
    os.nice(niceness)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def iter_image_batches(paths: Sequence[ImageFile], preprocess: Callable, batch_size: int = 64,
                       workers: int | None = None, pin_memory: bool = False,
                       max_pixels: int = DEFAULT_MAX_PIXELS,
                       uint8: bool = False, nice: int = 0) -> Iterator[ImageBatch]:
    """Yield preprocessed batches in input order; problems carry the offending path.

    nice: how far the worker processes lower their priority (DECODE_NICENESS when the
    encoder runs on the same CPU); this process keeps its own.

    uint8=True: when `preprocess` ends in ToTensor + Normalize, stop before them and yield
    uint8 pixels for `encode_image_batch` to normalise (see `split_tensor_tail`)."""
    workers = default_workers() if workers is None else workers
    split = split_tensor_tail(preprocess) if uint8 else None
    limits = decode_limits(preprocess, max_pixels)
    loader = DataLoader(
        _ImageFiles(paths, split[0] if split else preprocess, limits),
        batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None, persistent_workers=False,
        worker_init_fn=functools.partial(_step_back, nice) if nice and workers else None,
    )
    for batch in loader:
        batch.problems = [(i, Skipped(str(paths[i]), p.reason)) for i, p in batch.problems]
        yield batch


def encode_image_files(clip: ClipModel, paths: Sequence[Path], batch_size: int = 64,
                       workers: int | None = None, precision: str = "auto",
                       progress: Callable[[int], None] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, list[Skipped]]:
    """Encode image files; returns (embeddings (m, d), kept input positions (m,), problems)."""
    pin = clip.device.type == "cuda"
    chunks, kept, problems = [], [], []
    for batch in iter_image_batches(paths, clip.preprocess, batch_size, workers, pin,
                                    uint8=True, nice=decode_niceness(clip)):
        if batch.indices:
            chunks.append(encode_image_batch(clip, batch.pixels, precision))
            kept.extend(batch.indices)
        problems.extend(problem for _, problem in batch.problems)
        if progress:
            progress(len(batch.indices) + len(batch.problems))
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, clip.embed_dim), np.float32)
    return embeddings, np.asarray(kept, dtype=np.int64), problems
