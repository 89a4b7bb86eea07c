"""Index embeddings made elsewhere, without encoding: clip-retrieval's inference output.

`clip-retrieval inference` writes, for each output partition n (its number zero-padded to
the width of the partition count, e.g. `img_emb_07.npy` when there are 10 to 99):

    DIR/img_emb/img_emb_{n}.npy        (rows, d) image embeddings, float16, L2-normalised
    DIR/text_emb/text_emb_{n}.npy      (rows, d) caption embeddings, when text was enabled
    DIR/metadata/metadata_{n}.parquet  a row per sample: image_path, caption, then the
                                       sample's own metadata columns (url, key, ...)

Rows align across a partition's three files. An image row becomes an image item: an absolute
`image_path` under one of the import's `--media-root` folders (links and `..` resolved) is its
file, which the service may serve; any other path (outside the roots, relative, or a
webdataset key) stays in its metadata with the other columns and is never opened: a pack's
metadata comes from strangers and may name `/etc/passwd`. The report counts those. Its caption becomes a text item linked to it, embedded by the same row of
`text_emb_{n}.npy`; a caption with no text embeddings beside it is skipped and counted. A
partition with text embeddings only (text-only inference) gives free texts.

clipdex itself has no exported embedding format to read back: its indexing jobs' shards
(`retrieval.store.work`) hold positions into one job's inputs and are dropped when it ends.

The folder is read three times, one shard at a time and never whole: first only the headers
(shapes, dtypes, row counts), so that a misaligned or mixed-dimension folder fails before any
vector is read; then each shard's vectors, a chunk at a time, staged as float32 in the
index's work folder; then its metadata, a batch at a time, as the items table is written.
A corpus of any size is imported within the memory of one chunk plus what the index being
built needs (`--max-memory`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.config import DEFAULT_CONFIG, BuildConfig, Summary
from retrieval.ann.ondisk import BlockFiller, fill_here
from retrieval.ann.rowscan import row_chunks
from retrieval.errors import IndexMismatchError, ManifestError, ModelLoadError
from retrieval.models.choices import MODALITIES
from retrieval.models.identity import ModelIdentity, external_identity
from retrieval.progress import ProgressFactory
from retrieval.store import (
    ItemRecord,
    NewImage,
    NewText,
    StagedRows,
    StreamedRecords,
    linked_records,
    media,
    read_generation_manifest,
    write_error_report,
    write_generation,
)

FOLDERS = {"image": ("img_emb", "img_emb_"), "text": ("text_emb", "text_emb_")}
OWN_COLUMNS = ("image_path", "caption")  # the rest of a metadata row is the item's metadata
# float16 rounding moves a unit vector's norm by ~1e-3; rows further off are rescaled
NORM_TOLERANCE = 1e-2


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
class _KeptRows:
    """What the first pass over the shards kept: per shard, the rows of its img_emb and of
    its text_emb that become items (their vectors already staged on disk, in this order)."""

    images: list[np.ndarray] = field(default_factory=list)  # per shard: (kept,) row numbers
    texts: list[np.ndarray] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # by kind
    outside_roots: int = 0  # absolute image paths outside the media roots: metadata only
    problems: list[dict[str, Any]] = field(default_factory=list)  # errors.jsonl rows
    rescaled: int = 0

    def skip(self, kind: str, count: int, path: Path, reason: str, **where: Any) -> None:
        if count:
            self.skipped[kind] = self.skipped.get(kind, 0) + count
            self.problems.append({"path": str(path), "reason": reason, "kind": kind,
                                  "count": count, **where})

    def counts(self) -> tuple[int, int]:
        return sum(map(len, self.images)), sum(map(len, self.texts))


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
    images, texts = (_beside(folder, modality, number) for modality in MODALITIES)
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
                          progress: ProgressFactory | None = None,
                          fill_blocks: BlockFiller = fill_here,
                          media_roots: Sequence[Path] = ()) -> Summary:
    """A new generation of `out` (ids from 1: images, then texts) from clip-retrieval's
    inference output in `folder`; nothing is encoded.

    Memory stays bounded whatever the corpus size: a first pass stages the usable vectors,
    a chunk at a time, in the index's work folder (`StagedRows`), which the store then reads
    memory-mapped; a second pass produces the item records a metadata batch at a time while
    the items table is written (`StreamedRecords`). `media_roots`: the folders whose image
    files the index may serve (none by default: an imported path is then metadata only)."""
    started = time.perf_counter()
    shards = find_shards(folder)
    identity = resolve_model(model, shards[0].dim, Path(folder))
    staged = {m: StagedRows(out, f"embeddings-{m}", shards[0].dim, sum(
        s.rows for s in shards if (s.images if m == "image" else s.texts))) for m in FOLDERS}
    try:
        kept = _stage(shards, staged, progress)
        images, texts = kept.counts()
        ids = {"image": np.arange(1, images + 1, dtype=np.int64),
               "text": np.arange(images + 1, images + texts + 1, dtype=np.int64)}
        roots = media.cover(media_roots)
        records = StreamedRecords(ids, lambda: _records(shards, kept, roots))
        info = {"action": "build", "from_embeddings": str(Path(folder).resolve()),
                "layout": "clip-retrieval", "shards": len(shards), "rescaled": kept.rescaled,
                "skipped": sum(kept.skipped.values())}
        name = write_generation(out, identity, records, {m: staged[m].rows() for m in staged},
                                config.store_options(fill_blocks), info, roots)
    finally:
        for rows in staged.values():
            rows.remove()
    report = write_error_report(out, kept.problems)
    return Summary(generation=name, images=images, texts=texts, skipped=kept.skipped,
                   seconds=round(time.perf_counter() - started, 2), errors_file=str(report),
                   shards_read=len(shards), tuning=read_generation_manifest(out, name).tuning(),
                   outside_media_roots=kept.outside_roots)


def _stage(shards: list[EmbeddingShard], staged: dict[str, StagedRows],
           progress: ProgressFactory | None) -> _KeptRows:
    """First pass: each shard's usable vectors appended to the staged rows, the rows kept
    noted."""
    kept = _KeptRows()
    bar = progress("shards", len(shards)) if progress else None
    with staged["image"], staged["text"]:
        for shard in shards:
            _stage_shard(shard, kept, staged)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return kept


def _stage_shard(shard: EmbeddingShard, kept: _KeptRows, out: dict[str, StagedRows]) -> None:
    image_ok = _write_unit(shard.images, out["image"], kept)
    kept.images.append(np.flatnonzero(image_ok))
    kept.skip("bad_vector", int((~image_ok).sum()), shard.images,
              "zero or non-finite image embeddings", rows=_few(~image_ok))
    has_caption = _caption_mask(shard.metadata)
    if shard.texts is None:
        kept.texts.append(np.zeros(0, np.int64))
        kept.skip("caption_without_text_embedding", int(has_caption.sum()), shard.metadata,
                  f"captions without text_emb/text_emb_{shard.number}.npy")
        return
    text_ok = _write_unit(shard.texts, out["text"], kept, has_caption)
    kept.texts.append(np.flatnonzero(text_ok & has_caption))
    kept.skip("no_caption", int((text_ok & ~has_caption).sum()), shard.metadata,
              "text embeddings whose row has no caption", rows=_few(text_ok & ~has_caption))
    kept.skip("bad_vector", int((~text_ok).sum()), shard.texts,
              "zero or non-finite text embeddings", rows=_few(~text_ok))


def _write_unit(path: Path | None, out: StagedRows, kept: _KeptRows,
                wanted: np.ndarray | None = None) -> np.ndarray:
    """Append the usable unit rows of one .npy (also in `wanted`, when given) to `out`, a
    chunk at a time; returns the (rows,) mask of usable rows (finite, not zero). Rows whose
    norm is off by more than float16 rounding are rescaled (and counted)."""
    if path is None:
        return np.zeros(0, bool)
    rows = np.load(path, mmap_mode="r")
    ok = np.zeros(len(rows), bool)
    for start, chunk in row_chunks(rows):
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.linalg.norm(chunk.astype(np.float64), axis=1)
        good = np.isfinite(norms) & (norms > 1e-6)
        off = good & (np.abs(norms - 1.0) > NORM_TOLERANCE)
        if off.any():
            chunk[off] = (chunk[off] / norms[off, None]).astype(np.float32)
            kept.rescaled += int(off.sum())
        ok[start:start + len(chunk)] = good
        take = good if wanted is None else good & wanted[start:start + len(chunk)]
        out.write(chunk[take])
    return ok


def _caption_mask(metadata: Path) -> np.ndarray:
    """(rows,) whether each row of a partition's metadata has a caption (read alone)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(metadata)
    if "caption" not in table.schema_arrow.names:
        return np.zeros(table.metadata.num_rows, bool)
    mask = [np.array([_caption(c) is not None for c in batch.column(0).to_pylist()], bool)
            for batch in table.iter_batches(columns=["caption"])]
    return np.concatenate(mask) if mask else np.zeros(0, bool)


def _records(shards: list[EmbeddingShard], kept: _KeptRows,
             roots: list[str]) -> Iterator[list[ItemRecord]]:
    """Second pass: the item records, a metadata batch at a time, ids as `_stage` ordered
    the vectors (images 1.., then texts). A batch's kept images, and its kept texts, have
    consecutive ids, so `linked_records` links each caption to its row's image."""
    images, _ = kept.counts()
    next_image, next_text = 1, images + 1
    kept.outside_roots = 0  # the store may read the records twice
    for shard, image_rows, text_rows in zip(shards, kept.images, kept.texts):
        for offset, rows in _metadata_batches(shard.metadata):
            numbers = np.arange(offset, offset + len(rows))
            image_ids = _ids_of(numbers, image_rows, next_image)
            text_ids = _ids_of(numbers, text_rows, next_text)
            has_image, has_text = image_ids > 0, text_ids > 0
            position = np.cumsum(has_image) - 1  # each row's image among the batch's images
            new_images = [_image_item(rows[i], roots, kept)
                          for i in np.flatnonzero(has_image).tolist()]
            new_texts = [NewText(str(_caption(rows[i].get("caption"))), _metadata(rows[i]),
                                 image=int(position[i]) if has_image[i] else None)
                         for i in np.flatnonzero(has_text).tolist()]
            yield linked_records(new_images, new_texts,
                                 start_id=int(image_ids[has_image][0]) if has_image.any() else 0,
                                 text_start_id=int(text_ids[has_text][0]) if has_text.any()
                                 else 0)
        next_image, next_text = next_image + len(image_rows), next_text + len(text_rows)


def _ids_of(numbers: np.ndarray, kept_rows: np.ndarray, first_id: int) -> np.ndarray:
    """The item id of each row number (0 for a row not kept): kept row i has first_id + i."""
    at = np.searchsorted(kept_rows, numbers)
    found = at < len(kept_rows)
    found[found] = kept_rows[at[found]] == numbers[found]
    return np.where(found, first_id + at, 0)


def _metadata_batches(path: Path, size: int = 1 << 16) -> Iterator[tuple[int, list[dict]]]:
    import pyarrow.parquet as pq

    offset = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
        rows = batch.to_pylist()
        yield offset, rows
        offset += len(rows)


def _image_item(row: dict[str, Any], roots: list[str], kept: _KeptRows) -> NewImage:
    path, metadata = row.get("image_path"), _metadata(row)
    if isinstance(path, str) and path.startswith("/"):
        if roots and media.within(path, roots):
            return NewImage(str(media.real(path)), metadata)
        kept.outside_roots += 1
    if path not in (None, ""):  # outside the roots, relative or a webdataset key: not a file
        metadata["image_path"] = str(path)
    return NewImage(None, metadata)


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    """A row's own columns (url, key, width, ...): nulls, NaNs and pandas' index dropped."""
    return {key: value for key, value in row.items()
            if key not in OWN_COLUMNS and not key.startswith("__index_level_")
            and value is not None and not (isinstance(value, float) and math.isnan(value))}


def _caption(caption: Any) -> str | None:
    """A metadata row's caption cell as text, or None when it has none."""
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
