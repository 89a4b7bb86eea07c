"""Index embeddings made elsewhere, without encoding: clip-retrieval's inference output.

`clip-retrieval inference` writes, for each output partition n (its number zero-padded to
the width of the partition count, e.g. `img_emb_07.npy` when there are 10 to 99):

    DIR/img_emb/img_emb_{n}.npy        (rows, d) image embeddings, float16, L2-normalised
    DIR/text_emb/text_emb_{n}.npy      (rows, d) caption embeddings, when text was enabled
    DIR/metadata/metadata_{n}.parquet  a row per sample: image_path, caption, then the
                                       sample's own metadata columns (url, key, ...)

Rows align across a partition's three files. An image row becomes an image item: an absolute
`image_path` is its path, a relative one (or a webdataset key) stays in its metadata with the
other columns. Its caption becomes a text item linked to it, embedded by the same row of
`text_emb_{n}.npy`; a caption with no text embeddings beside it is skipped and counted. A
partition with text embeddings only (text-only inference) gives free texts.

clipdex itself has no exported embedding format to read back: its indexing jobs' shards
(`retrieval.store.work`) hold positions into one job's inputs and are dropped when it ends.

The folder is read twice, one shard at a time: first only the headers (shapes, dtypes, row
counts), so that a misaligned or mixed-dimension folder fails before any vector is read; then
each shard's vectors into one preallocated (n, d) float32 matrix per modality, which is what
the store needs to write a generation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.build import BuildConfig, ProgressFactory, Summary
from retrieval.errors import IndexMismatchError, ManifestError, ModelLoadError
from retrieval.manifest import read_rows
from retrieval.store import (
    ModelIdentity,
    NewImage,
    NewText,
    external_identity,
    linked_records,
    read_generation_manifest,
    write_error_report,
    write_generation,
)

FOLDERS = {"image": ("img_emb", "img_emb_"), "text": ("text_emb", "text_emb_")}
OWN_COLUMNS = ("image_path", "caption")  # the rest of a metadata row is the item's metadata
# float16 rounding moves a unit vector's norm by ~1e-3; rows further off are rescaled
NORM_TOLERANCE = 1e-2
DEFAULT_CONFIG = BuildConfig()  # only its store options (memory budget, index type) are used


@dataclass(frozen=True)
class ExternalModel:
    """A model clipdex cannot load, known by name only (`--model external:NAME`)."""

    name: str


@dataclass(frozen=True)
class EmbeddingShard:
    """One clip-retrieval output partition: its metadata and the embeddings beside it."""

    number: str  # as spelt in the file names ("007")
    metadata: Path
    images: Path | None  # img_emb_{n}.npy, None when image inference was off
    texts: Path | None  # text_emb_{n}.npy, None when text inference was off
    rows: int = 0
    dim: int = 0


@dataclass
class _Collected:
    """Items and their vectors gathered shard by shard, in record order per modality."""

    image_vectors: np.ndarray  # (rows of all img_emb files, d), filled from the top
    text_vectors: np.ndarray  # (rows of all text_emb files, d), filled from the top
    images: list[NewImage] = field(default_factory=list)
    texts: list[NewText] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # by kind
    problems: list[dict[str, Any]] = field(default_factory=list)  # errors.jsonl rows
    rescaled: int = 0

    def skip(self, kind: str, count: int, path: Path, reason: str, **where: Any) -> None:
        if count:
            self.skipped[kind] = self.skipped.get(kind, 0) + count
            self.problems.append({"path": str(path), "reason": reason, "kind": kind,
                                  "count": count, **where})


def find_shards(folder: Path) -> list[EmbeddingShard]:
    """The partitions of a clip-retrieval output folder, in partition order, headers checked:
    rows of each .npy equal its metadata's, one dimension throughout (ManifestError naming
    the file otherwise)."""
    folder = Path(folder)
    if not (folder / "metadata").is_dir():
        raise ManifestError(f"{folder}: no metadata/ folder; --from-embeddings reads "
                            "clip-retrieval's inference output (img_emb/, text_emb/, metadata/)")
    found = {path.stem.removeprefix("metadata_"): path
             for path in (folder / "metadata").glob("metadata_*.parquet")}
    if not found:
        raise ManifestError(f"{folder / 'metadata'}: no metadata_N.parquet files")
    for name, prefix in FOLDERS.values():
        for path in (folder / name).glob(f"{prefix}*.npy"):
            number = path.stem.removeprefix(prefix)
            if number not in found:
                raise ManifestError(f"{path} has no metadata/metadata_{number}.parquet to align "
                                    "its rows with")
    bad = sorted(number for number in found if not number.isdigit())
    if bad:
        raise ManifestError(f"{found[bad[0]]}: not a numbered clip-retrieval partition")
    shards = [_checked(folder, number, found[number]) for number in sorted(found, key=int)]
    dims = {shard.dim for shard in shards}
    if len(dims) > 1:
        first = next(s for s in shards if s.dim != shards[0].dim)
        raise ManifestError(f"{first.images or first.texts} has dimension {first.dim}, "
                            f"{shards[0].images or shards[0].texts} has {shards[0].dim}: "
                            "one folder, one model")
    return shards


def _checked(folder: Path, number: str, metadata: Path) -> EmbeddingShard:
    images, texts = (_beside(folder, modality, number) for modality in ("image", "text"))
    rows = _parquet_rows(metadata)
    dims = set()
    for path in (p for p in (images, texts) if p is not None):
        shape = _npy_shape(path)
        if shape[0] != rows:
            raise ManifestError(f"{path} has {shape[0]} rows, {metadata} has {rows}: a "
                                "partition's rows must align")
        dims.add(shape[1])
    if not dims:
        raise ManifestError(f"{metadata}: neither img_emb/img_emb_{number}.npy nor "
                            f"text_emb/text_emb_{number}.npy exists beside it")
    if len(dims) > 1:
        raise ManifestError(f"{images} and {texts} have different dimensions {sorted(dims)}")
    return EmbeddingShard(number, metadata, images, texts, rows, dims.pop())


def _beside(folder: Path, modality: str, number: str) -> Path | None:
    name, prefix = FOLDERS[modality]
    path = folder / name / f"{prefix}{number}.npy"
    return path if path.is_file() else None


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception as error:  # pyarrow raises several unrelated types
        raise ManifestError(f"{path}: unreadable parquet file ({error})") from error


def _npy_shape(path: Path) -> tuple[int, int]:
    """The (rows, d) of a float .npy, read from its header (memory-mapped, no data read)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path}: unreadable .npy file ({error})") from None
    if array.ndim != 2 or array.dtype.kind != "f":
        raise ManifestError(f"{path}: {array.dtype} array of shape {array.shape}, expected "
                            "(rows, d) floats")
    return int(array.shape[0]), int(array.shape[1])


def resolve_model(model: ModelIdentity | ExternalModel, dim: int, folder: Path) -> ModelIdentity:
    """The identity the generation records: the named model's, once its dimension is checked
    against the vectors, or an external one that no loadable model matches."""
    if isinstance(model, ExternalModel):
        return external_identity(model.name, dim)
    if model.embed_dim != dim:
        raise IndexMismatchError(
            f"the embeddings in {folder} have dimension {dim}, the model {model.arch} gives "
            f"{model.embed_dim}: name the model that made them with --model, or record it as "
            "external with --model external:NAME")
    return model


def build_from_embeddings(folder: Path, out: Path, model: ModelIdentity | ExternalModel,
                          config: BuildConfig = DEFAULT_CONFIG,
                          progress: ProgressFactory | None = None) -> Summary:
    """A new generation of `out` (ids from 1: images, then texts) from clip-retrieval's
    inference output in `folder`; nothing is encoded."""
    started = time.perf_counter()
    shards = find_shards(folder)
    identity = resolve_model(model, shards[0].dim, Path(folder))
    collected = _Collected(*(np.empty((sum(s.rows for s in shards if getattr(s, attr)),
                                       shards[0].dim), np.float32)
                             for attr in ("images", "texts")))
    bar = progress("shards", len(shards)) if progress else None
    for shard in shards:
        _collect(shard, collected)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    records = linked_records(collected.images, collected.texts, start_id=1)
    vectors = {"image": collected.image_vectors[:len(collected.images)],
               "text": collected.text_vectors[:len(collected.texts)]}
    info = {"action": "build", "from_embeddings": str(Path(folder).resolve()),
            "layout": "clip-retrieval", "shards": len(shards), "rescaled": collected.rescaled,
            "skipped": sum(collected.skipped.values())}
    name = write_generation(out, identity, records, vectors, config.store_options(), info)
    report = write_error_report(out, collected.problems)
    return Summary(generation=name, images=len(collected.images), texts=len(collected.texts),
                   skipped=collected.skipped, seconds=round(time.perf_counter() - started, 2),
                   errors_file=str(report), shards_read=len(shards),
                   tuning=read_generation_manifest(out, name).tuning())


def _collect(shard: EmbeddingShard, into: _Collected) -> None:
    """Add one partition's items and vectors (its files read now, and only its files)."""
    rows = read_rows(shard.metadata)  # (rows,) dicts: image_path, caption, metadata columns
    image_vectors, image_ok = _load_unit(shard.images, into)
    text_vectors, text_ok = _load_unit(shard.texts, into)
    owners: list[int | None] = [None] * len(rows)  # row -> position of its image item
    if image_vectors is not None:
        kept = np.flatnonzero(image_ok)
        start = len(into.images)
        into.image_vectors[start:start + len(kept)] = image_vectors[kept]
        for position, row in enumerate(kept.tolist(), start=start):
            owners[row] = position
            into.images.append(_image_item(rows[row]))
        into.skip("bad_vector", len(rows) - len(kept), shard.images,
                  "zero or non-finite image embeddings", rows=_few(~image_ok))
    captions = [_caption(row) for row in rows]
    if text_vectors is None:
        into.skip("caption_without_text_embedding", sum(c is not None for c in captions),
                  shard.metadata, f"captions without text_emb/text_emb_{shard.number}.npy")
        return
    has_caption = np.array([c is not None for c in captions], bool)
    usable = has_caption & text_ok
    into.skip("no_caption", int((text_ok & ~has_caption).sum()), shard.metadata,
              "text embeddings whose row has no caption", rows=_few(text_ok & ~has_caption))
    into.skip("bad_vector", int((~text_ok).sum()), shard.texts,
              "zero or non-finite text embeddings", rows=_few(~text_ok))
    kept = np.flatnonzero(usable)
    start = len(into.texts)
    into.text_vectors[start:start + len(kept)] = text_vectors[kept]
    for row in kept.tolist():
        owner = owners[row]
        metadata = {} if owner is not None else _metadata(rows[row])
        into.texts.append(NewText(str(captions[row]), metadata, image=owner))


def _load_unit(path: Path | None, into: _Collected) -> tuple[np.ndarray | None, np.ndarray]:
    """(rows, d) float32 unit rows of one .npy and the mask of usable rows (finite, not zero);
    rows whose norm is off by more than float16 rounding are rescaled (and counted)."""
    if path is None:
        return None, np.zeros(0, bool)
    vectors = np.load(path).astype(np.float32, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)  # (rows,)
    ok = np.isfinite(norms) & (norms > 1e-6)
    off = ok & (np.abs(norms - 1.0) > NORM_TOLERANCE)
    if off.any():
        vectors[off] = (vectors[off] / norms[off, None]).astype(np.float32)
        into.rescaled += int(off.sum())
    return vectors, ok


def _image_item(row: dict[str, Any]) -> NewImage:
    path, metadata = row.get("image_path"), _metadata(row)
    if isinstance(path, str) and path.startswith("/"):
        return NewImage(path, metadata)
    if path not in (None, ""):  # a relative path or a webdataset key: no file to serve
        metadata["image_path"] = str(path)
    return NewImage(None, metadata)


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    """A row's own columns (url, key, width, ...): nulls, NaNs and pandas' index dropped."""
    return {key: value for key, value in row.items()
            if key not in OWN_COLUMNS and not key.startswith("__index_level_")
            and value is not None and not (isinstance(value, float) and math.isnan(value))}


def _caption(row: dict[str, Any]) -> str | None:
    caption = row.get("caption")
    if caption is None or (isinstance(caption, float) and math.isnan(caption)):
        return None
    text = str(caption).strip()
    return text or None


def _few(mask: np.ndarray, limit: int = 20) -> list[int]:
    """The first rows a mask marks, for errors.jsonl."""
    return np.flatnonzero(mask)[:limit].tolist()


def parse_model(spec: str) -> ExternalModel | None:
    """`external:NAME` names a model outside clipdex; any other spec is loaded."""
    prefix, _, name = spec.partition(":")
    if prefix != "external":
        return None
    if not name.strip():
        raise ModelLoadError("--model external:NAME needs the model's name, e.g. "
                            "external:ViT-L-14:openai")
    return ExternalModel(name.strip())
