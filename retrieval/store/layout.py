"""Every path inside an index directory, the SQLite schema and the format tag: the one place
that knows where things live. Nothing outside `retrieval.store` joins paths under an index root.

    DIR/CURRENT                       name of the live generation ("000007")
    DIR/.lock                         the writers' file lock (readers never lock)
    DIR/generations/000007/
        images.faiss  texts.faiss     IndexIDMap2 over stable item ids (tombstones included),
                                      or an IVF-PQ whose lists are in:
        images.ivfdata texts.ivfdata  the on-disk inverted lists (kind "ivfpq-disk")
        images.npy    texts.npy       (rows, d) float32 embeddings, so rebuilds never re-encode
        images.ids.npy texts.ids.npy  (rows,) int64 ascending ids, row-aligned with the .npy
        items.sqlite                  one row per item: id, modality, path/text, captions, ...;
                                      the typed metadata fields (`fields`, `item_fields`)
        manifest.json                 model identity, counts, index specs, tuning, SHA-256s
    DIR/work/<job>/                   an indexing job's resumable shards (`store.work`):
                                      .npy + .json in one process, .parquet from Ray
    DIR/work/scratch-*.npy            rows a writer stages while deriving an on-disk index
    DIR/work/staged-*.npy             vectors an import stages before it writes a generation
    DIR/errors.jsonl                  the inputs the last indexing job skipped, with reasons
    DIR/uploads/<sha256>.<ext>        images added through the service's admin API

Stored item paths are relative to the index root for uploads (so the directory can move, and
no response shows the server's file system), absolute for files the indexer read from their
own folders.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import NamedTuple

from retrieval.atomic import write_bytes_atomic
from retrieval.errors import IndexCorruptError, IndexNotFoundError

FORMAT = "clipdex-index/1"
PLURAL = {"image": "images", "text": "texts"}  # file-name stem of each modality
MANIFEST = "manifest.json"
ITEMS = "items.sqlite"
UPLOADS = "uploads"
CURRENT_CHARS = 256  # read of CURRENT; a generation name is a few digits
_GENERATION_NAME = re.compile(r"[0-9]{1,20}")
SCHEMA = """
CREATE TABLE items (id INTEGER PRIMARY KEY, modality TEXT NOT NULL, path TEXT, text TEXT,
                    captions TEXT NOT NULL, metadata TEXT NOT NULL, image_id INTEGER,
                    deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX items_path ON items(path);
CREATE INDEX items_image ON items(image_id);
"""
# Filterable metadata (see `retrieval.store.fields`): one row per field with its inferred type
# (and the inference's running state, so a derived generation updates it without a rescan),
# and one row per (item, field, value). Strings sit in str_value; numbers, booleans (0/1) and
# date-times (seconds since the epoch, UTC) in num_value. A generation written before fields
# existed has neither table: it has no fields. The indexes are made after a bulk fill.
FIELDS_SCHEMA = """
DROP TABLE IF EXISTS item_fields;
DROP TABLE IF EXISTS fields;
CREATE TABLE fields (name TEXT PRIMARY KEY, type TEXT NOT NULL, items INTEGER NOT NULL,
                     inference TEXT NOT NULL);
CREATE TABLE item_fields (id INTEGER NOT NULL, field TEXT NOT NULL, str_value TEXT,
                          num_value REAL);
"""
FIELDS_INDEXES = """
CREATE INDEX IF NOT EXISTS item_fields_str ON item_fields(field, str_value, id);
CREATE INDEX IF NOT EXISTS item_fields_num ON item_fields(field, num_value, id);
CREATE INDEX IF NOT EXISTS item_fields_id ON item_fields(id);
"""
# Keyword search (`retrieval.store.keywords`): SQLite FTS5 over each item's words (its text or
# captions, file name and string metadata), contentless (the words live in `items`), rowid =
# item id; rebuilt at each commit. Older generations have none.
KEYWORDS_SCHEMA = """
DROP TABLE IF EXISTS item_words;
CREATE VIRTUAL TABLE item_words USING fts5(body, content='',
                                           tokenize='unicode61 remove_diacritics 2');
"""


# ----------------------------------------------------------------------------- the root


def current_file(root: Path) -> Path:
    return Path(root) / "CURRENT"


def current_temp_file(root: Path) -> Path:
    """Written first, then renamed over CURRENT (the atomic switch)."""
    return Path(root) / "CURRENT.tmp"


def lock_file(root: Path) -> Path:
    return Path(root) / ".lock"


def generations_dir(root: Path) -> Path:
    return Path(root) / "generations"


def generation_dir(root: Path, name: str) -> Path:
    """generations/<name>; IndexNotFoundError for anything but a plain generation name, so no
    name (from CURRENT, a command line or a client) reaches outside generations/."""
    if not is_generation_name(name):
        raise IndexNotFoundError(f"no generation {_shown(name)} in {root}: generation names "
                                 "are digits, e.g. 000007")
    return generations_dir(root) / name


def is_generation_name(name: str) -> bool:
    """Digits only, as `commit` names generations ("000007"), and never a path."""
    return bool(_GENERATION_NAME.fullmatch(name))


def work_dir(root: Path) -> Path:
    return Path(root) / "work"


def job_dir(root: Path, job: str) -> Path:
    return work_dir(root) / job


def scratch_rows(root: Path, name: str) -> Path:
    """work/scratch-<name>.npy: rows a writer stages on disk while it derives a generation
    larger than RAM (removed when the writer is done)."""
    return work_dir(root) / f"scratch-{name}.npy"


def staged_rows(root: Path, name: str) -> Path:
    """work/staged-<name>.npy: vectors an import stages before the generation is written."""
    return work_dir(root) / f"staged-{name}.npy"


def stale_scratch(root: Path) -> list[Path]:
    """Scratch rows left by a writer that was killed (only a writer, under the lock, looks)."""
    work = work_dir(root)
    return sorted(work.glob("scratch-*.npy")) if work.is_dir() else []


def errors_file(root: Path) -> Path:
    return Path(root) / "errors.jsonl"


def current_name(root: Path) -> str:
    """The live generation's name; IndexNotFoundError when `root` holds no index,
    IndexCorruptError when CURRENT holds anything but a generation name."""
    pointer = current_file(root)
    if not pointer.is_file():
        raise IndexNotFoundError(f"{root} is not a clipdex index (no CURRENT file); "
                                 "build one with `clipdex index build`")
    try:
        name = _read_pointer(pointer)
    except (OSError, UnicodeDecodeError) as error:
        raise IndexCorruptError(f"{pointer}: unreadable ({error})") from None
    if not is_generation_name(name):
        raise IndexCorruptError(f"{pointer} holds {_shown(name)}, not a generation name "
                                "(digits, e.g. 000007); point it at a folder of generations/")
    return name


def read_current(root: Path) -> str | None:
    """What CURRENT says now (at most its first CURRENT_CHARS characters), or None when it is
    absent, empty or unreadable: a poller's question, which opens nothing. Whether it names a
    generation is `current_name`'s to say, when the generation is opened."""
    try:
        return _read_pointer(current_file(root)) or None
    except (OSError, UnicodeDecodeError):
        return None


def _read_pointer(pointer: Path) -> str:
    with open(pointer, encoding="utf-8") as handle:
        return handle.read(CURRENT_CHARS).strip()


def _shown(name: str) -> str:
    return repr(name) if len(name) <= 40 else f"{name[:37]!r}... ({len(name)} characters)"


# ----------------------------------------------------------------------------- a generation


class ModalityFiles(NamedTuple):
    index: Path  # <plural>.faiss
    vectors: Path  # <plural>.npy
    ids: Path  # <plural>.ids.npy
    lists: Path  # <plural>.ivfdata (only an index with its lists on disk has one)
    projection: Path  # <plural>.pca.npz (`retrieval.store.reduced`; HNSW generations)
    reduced: Path  # <plural>.reduced.npy, the rows' principal components


def modality_files(folder: Path, modality: str) -> ModalityFiles:
    folder, plural = Path(folder), PLURAL[modality]
    return ModalityFiles(folder / f"{plural}.faiss", folder / f"{plural}.npy",
                         folder / f"{plural}.ids.npy", folder / f"{plural}.ivfdata",
                         folder / f"{plural}.pca.npz", folder / f"{plural}.reduced.npy")


def manifest_file(folder: Path) -> Path:
    return Path(folder) / MANIFEST


def items_file(folder: Path) -> Path:
    return Path(folder) / ITEMS


def read_only_uri(path: Path) -> str:
    """SQLite URI opening a committed (immutable) items table read-only; absolute, since
    SQLite URIs cannot be relative."""
    return f"{Path(path).resolve().as_uri()}?mode=ro&immutable=1"


# ----------------------------------------------------------------------------- work/


class ShardFiles(NamedTuple):
    vectors: Path  # <prefix>-00012.npy: the kept embeddings
    meta: Path  # <prefix>-00012.json: positions and problems, written last (the commit mark)


def job_record(job: Path) -> Path:
    """job.json: what the job was started from (its parent generation)."""
    return Path(job) / "job.json"


def shard_files(job: Path, prefix: str, shard: int) -> ShardFiles:
    name = f"{prefix}-{shard:05d}"
    return ShardFiles(Path(job) / f"{name}.npy", Path(job) / f"{name}.json")


def parquet_shard_file(job: Path, prefix: str, shard: int) -> Path:
    """<prefix>-00012.parquet: one shard of a Ray build, its own commit mark (written whole
    under a temporary name, then renamed)."""
    return Path(job) / f"{prefix}-{shard:05d}.parquet"


# ----------------------------------------------------------------------------- uploads/


def upload_path(data: bytes, suffix: str) -> str:
    """Where an uploaded image is kept, relative to the index root: named by its content, so
    the same bytes are the same file (and the same item)."""
    return f"{UPLOADS}/{hashlib.sha256(data).hexdigest()[:32]}{suffix}"


def keep_upload(root: Path, stored: str, data: bytes) -> None:
    """Write an upload atomically: a crash leaves it whole or absent, and two requests
    keeping the same bytes at once each write their own temp file."""
    path = Path(root) / stored
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)

