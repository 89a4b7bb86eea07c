"""Inputs written as other tools write them: a folder in clip-retrieval's inference layout
(numbered partitions of img_emb/, text_emb/ and metadata/, float16 unit vectors, parquet
metadata), and webdataset tar shards as img2dataset writes them."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tests.conftest import COLOURS


@dataclass
class Partition:
    """One output partition: metadata rows, and the embeddings clip-retrieval saved beside."""

    rows: list[dict[str, Any]]  # image_path, caption, url, ...
    images: np.ndarray | None  # (len(rows), d) or None (image inference off)
    texts: np.ndarray | None  # (len(rows), d) or None (text inference off)


def unit_vectors(rng: np.random.Generator, count: int, dim: int,
                 dtype: Any = np.float16) -> np.ndarray:
    """(count, dim) L2-normalised rows, stored in `dtype` as clip-retrieval's mapper does."""
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(dtype)


def write_clip_retrieval(folder: Path, partitions: Sequence[Partition]) -> Path:
    """Write `partitions` as numbered shards, the numbers zero-padded to the width of the
    partition count as clip-retrieval's OutputSink pads them."""
    width = int(math.log10(len(partitions))) + 1
    for name in ("img_emb", "text_emb", "metadata"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for number, partition in enumerate(partitions):
        tag = str(number).zfill(width)
        if partition.images is not None:
            np.save(folder / "img_emb" / f"img_emb_{tag}.npy", partition.images)
        if partition.texts is not None:
            np.save(folder / "text_emb" / f"text_emb_{tag}.npy", partition.texts)
        pq.write_table(pa.Table.from_pylist(partition.rows),
                       folder / "metadata" / f"metadata_{tag}.parquet")
    return folder


def sample_partitions(dim: int, sizes: Sequence[int] = (5, 3), seed: int = 0,
                      image_root: Path | None = None) -> list[Partition]:
    """Partitions of images with one caption each: float16 in the first, float32 after it
    (both are what clip-retrieval users have on disk); image paths absolute when
    `image_root` is given, else webdataset-style keys."""
    rng = np.random.default_rng(seed)
    partitions, n = [], 0
    for shard, size in enumerate(sizes):
        dtype = np.float16 if shard == 0 else np.float32
        rows = []
        for _ in range(size):
            key = f"{n:09d}"
            path = str(image_root / f"{key}.jpg") if image_root is not None else key
            rows.append({"image_path": path, "caption": f"caption number {n}",
                         "url": f"https://example.com/{key}.jpg", "key": key})
            n += 1
        partitions.append(Partition(rows, unit_vectors(rng, size, dim, dtype),
                                    unit_vectors(rng, size, dim, dtype)))
    return partitions


def stacked(partitions: Sequence[Partition], modality: str) -> np.ndarray:
    """All partitions' vectors of one modality in order, as float32 (n, d)."""
    parts = [getattr(p, modality) for p in partitions if getattr(p, modality) is not None]
    return np.concatenate(parts).astype(np.float32)


def image_bytes(colour: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with `members` in order, as img2dataset's writer lays samples out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_shard(path: Path, first: int, colours: list[str]) -> Path:
    """A shard of samples numbered from `first`: `KEY.jpg`, `KEY.txt`, img2dataset's `KEY.json`."""
    members = []
    for n, colour in enumerate(colours, start=first):
        key = f"{n:09d}"
        record = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                  "caption": f"a {colour} square", "width": 40}
        members += [(f"{key}.jpg", image_bytes(COLOURS[colour])),
                    (f"{key}.txt", f"a {colour} square".encode()),
                    (f"{key}.json", json.dumps(record).encode())]
    return write_shard(path, members)
