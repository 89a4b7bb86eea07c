"""What to index: image folders, caption manifests and plain text corpora, as one list each.

A folder is scanned recursively; an image's caption may sit beside it as `name.txt` (one
caption a line) or `name.json` (captions plus metadata), and a manifest at the folder's top
(e.g. data/demo/captions.csv) adds its captions to the images it names. A manifest file with
an image column is an image source; one with only a text column, or a `.txt` file (one text a
line), is a text corpus searchable on its own. A webdataset `.tar` shard (img2dataset's output; a
folder's shards are read too) gives an image per sample, its `.txt` / `.json` members read
like the sidecars above, with the sample's key and shard name added to its metadata.

Every image of a folder gets the fields `folder`, `file_name`, `modified`, `file_size`,
`sha256` (of its bytes: `index sync` knows a moved or only touched file by it), `width`,
`height` and, when its EXIF says, `taken`; a manifest's extra columns and a sidecar's keys are fields
too (CSV cells typed as `retrieval.inputs.captions.cell_value` says). See retrieval/fields/values.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from indexer.selection import EVERYTHING_VISIBLE, Selection
from indexer.webdataset import TAR_EXTENSIONS, Sample, read_shard
from retrieval.digest import sha256_file
from retrieval.errors import ManifestError
from retrieval.inputs.captions import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    Skipped,
    pick_column,
    read_manifest,
    read_rows,
    typed_metadata,
)
from retrieval.inputs.demo import DEMO_DIR, ensure_demo_corpus
from retrieval.inputs.images import header_facts
from retrieval.models.files import ImageFile, TarMember

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".mpo", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff",
                    ".heic", ".heif", ".hif", ".avif"}
MANIFEST_EXTENSIONS = {".csv", ".tsv", ".jsonl", ".ndjson", ".parquet"}
SIDECAR_CAPTION_KEYS = ("caption", "captions", "text", "texts")


@dataclass
class ImageEntry:
    path: Path  # resolved, so the same file from two sources is one item (ARCHIVE/MEMBER in a tar)
    captions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    member: TarMember | None = None  # where the image is, when it is inside a tar shard

    @property
    def source(self) -> ImageFile:
        """What the decoder reads."""
        return self.member or self.path

    @property
    def file(self) -> Path:
        """The file on disk that holds the image (a tar shard for a member)."""
        return self.member.archive if self.member else self.path


@dataclass
class TextEntry:
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Collection:
    images: list[ImageEntry]
    texts: list[TextEntry]
    problems: list[Skipped]
    excluded: int = 0  # folder entries left out by `Selection` (counted, not listed)

    @property
    def num_captions(self) -> int:
        return sum(len(entry.captions) for entry in self.images)


def collect(sources: Sequence[Path], selection: Selection = EVERYTHING_VISIBLE) -> Collection:
    """Read every source into one de-duplicated collection, in a stable order."""
    images: dict[Path, ImageEntry] = {}
    texts: list[TextEntry] = []
    problems: list[Skipped] = []
    excluded = 0
    for source in map(Path, sources):
        if source.resolve() == DEMO_DIR.resolve():
            ensure_demo_corpus()  # a fresh clone has no data/demo: captions ship in the package
        if source.is_dir():
            found, left_out = _scan_folder(source, problems, selection)
            _merge(images, found)
            excluded += left_out
            for shard in sorted(source.rglob("*.tar")):
                _merge(images, _shard_images(shard, problems))
            for manifest in sorted(p for p in source.iterdir()
                                   if p.suffix.lower() in MANIFEST_EXTENSIONS):
                _merge(images, _manifest_images(manifest, problems))
        elif source.suffix.lower() in TAR_EXTENSIONS:
            _merge(images, _shard_images(source, problems))
        elif source.suffix.lower() == ".txt":
            texts += _text_lines(source)
        elif source.suffix.lower() in MANIFEST_EXTENSIONS:
            found, corpus = _manifest_file(source, problems)
            _merge(images, found)
            texts += corpus
        elif source.exists():
            raise ManifestError(f"{source}: not a folder, manifest (.csv, .jsonl, .parquet), "
                                "webdataset shard (.tar) or text corpus (.txt)")
        else:
            raise ManifestError(f"source {source} does not exist")
    return Collection(list(images.values()), texts, problems, excluded)


def _merge(images: dict[Path, ImageEntry], found: Iterable[ImageEntry]) -> None:
    for entry in found:
        known = images.get(entry.path)
        if known is None:
            images[entry.path] = entry
            continue
        known.captions += [c for c in entry.captions if c not in known.captions]
        known.metadata.update(entry.metadata)


def _scan_folder(folder: Path, problems: list[Skipped], selection: Selection
                 ) -> tuple[list[ImageEntry], int]:
    """The folder's images (sidecars read, facts gathered) and how many entries the
    selection left out."""
    entries = []
    paths, excluded = selection.walk(folder)
    for path in paths:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            captions, metadata = _sidecars(path, problems)
            facts = _file_facts(path, folder, selection.hash_files)
            entries.append(ImageEntry(path.resolve(), captions, {**facts, **metadata}))
    return entries, excluded


def _file_facts(path: Path, root: Path, content_hash: bool = True) -> dict[str, Any]:
    """What a folder tells about each image, as filterable fields (a sidecar's keys win):
    `folder` relative to the source root ("" at its top; never the server's own layout),
    `file_name`, `modified` (UTC), `file_size`, `sha256` of the bytes (unless
    `content_hash` is off: a sync hashes only the files it must), and from the header
    `width`, `height` and `taken`."""
    folder = path.parent.relative_to(root).as_posix()
    stat = path.stat()
    facts = {"folder": "" if folder == "." else folder, "file_name": path.name,
             "modified": modified_of(stat), "file_size": stat.st_size}
    if content_hash:
        facts["sha256"] = sha256_file(path)
    return {**facts, **header_facts(path)}


def modified_of(stat: os.stat_result) -> str:
    """A file's modification time as stored in `modified` (UTC, whole seconds)."""
    return datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(timespec="seconds")


def _sidecars(image: Path, problems: list[Skipped]) -> tuple[list[str], dict[str, Any]]:
    """Captions and metadata from `image.txt` / `image.json` beside the image, if any."""
    text_file, json_file = image.with_suffix(".txt"), image.with_suffix(".json")
    return _sidecar_fields(text_file.read_text(errors="replace") if text_file.is_file() else None,
                           _read_json(json_file, problems) if json_file.is_file() else None)


def _read_json(path: Path, problems: list[Skipped]) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problems.append(Skipped(str(path), f"caption sidecar is not JSON ({error})"))
        return None


def _sidecar_fields(text: str | None, data: Any) -> tuple[list[str], dict[str, Any]]:
    """Captions (one a line of the text, then the JSON's caption keys) and metadata (the
    JSON object's other keys)."""
    captions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    metadata: dict[str, Any] = {}
    if isinstance(data, dict):
        data = dict(data)
        for key in SIDECAR_CAPTION_KEYS:
            captions += _as_texts(data.pop(key, None))
        metadata = data
    else:
        captions += _as_texts(data)
    return captions, metadata


def _shard_images(shard: Path, problems: list[Skipped]) -> list[ImageEntry]:
    """A webdataset shard's samples; the caption img2dataset writes to both the .txt and the
    .json member is kept once."""
    return [_sample_entry(sample, problems) for sample in read_shard(shard, problems)]


def _sample_entry(sample: Sample, problems: list[Skipped]) -> ImageEntry:
    member = sample.image
    assert member is not None  # read_shard keeps only samples with an image
    data = None
    if sample.json is not None:
        try:
            data = json.loads(sample.json)
        except json.JSONDecodeError as error:
            problems.append(Skipped(f"{member.archive}/{sample.key}.json",
                                    f"caption sidecar is not JSON ({error})"))
    captions, metadata = _sidecar_fields(sample.text, data)
    metadata.update(key=sample.key, shard=member.archive.name)
    return ImageEntry(member.path, list(dict.fromkeys(captions)), metadata, member)


def _as_texts(value: Any) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(text).strip() for text in values if str(text).strip()]


def _manifest_file(path: Path, problems: list[Skipped]) -> tuple[list[ImageEntry],
                                                                 list[TextEntry]]:
    columns = _columns(path)
    if pick_column(columns, None, IMAGE_COLUMNS, path, "image paths"):
        return _manifest_images(path, problems), []
    text_key = pick_column(columns, None, CAPTION_COLUMNS, path, "texts")
    if text_key is None:
        raise ManifestError(f"{path}: no image column {IMAGE_COLUMNS} and no text column "
                            f"{CAPTION_COLUMNS} (columns: {columns})")
    return [], _manifest_texts(path, text_key)


def _columns(path: Path) -> list[str]:
    rows = read_rows(path)
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows")
    return list(rows[0].keys())


def _manifest_images(path: Path, problems: list[Skipped]) -> list[ImageEntry]:
    """Images named by a manifest; a folder's own CSV without an image column is not one."""
    if not pick_column(_columns(path), None, IMAGE_COLUMNS, path, "image paths"):
        return []
    manifest = read_manifest(path)
    problems += manifest.problems
    entries = []
    for item in manifest.items:
        metadata = dict(item.metadata)
        if item.label is not None:
            metadata["label"] = item.label
        entries.append(ImageEntry(item.image.resolve(), list(item.captions), metadata))
    return entries


def _manifest_texts(path: Path, text_key: str) -> list[TextEntry]:
    texts = []
    for number, row in enumerate(read_rows(path), start=1):
        for text in _as_texts(row.get(text_key)):
            metadata = typed_metadata(path, {k: v for k, v in row.items() if k != text_key})
            texts.append(TextEntry(text, {"source": path.name, "row": number, **metadata}))
    return texts


def _text_lines(path: Path) -> list[TextEntry]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    # `source` is the file's name: item metadata reaches clients, the server's layout must not
    return [TextEntry(line.strip(), {"source": path.name, "line": number})
            for number, line in enumerate(lines, start=1) if line.strip()]
