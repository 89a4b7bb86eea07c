"""The on-disk index store, the one owner of an index directory. Import from `retrieval.store`.

    layout    every path under an index root, the SQLite schema, the format tag
    manifest  a generation's manifest.json: model identity, a cheap read (no FAISS)
    media     which files a generation may serve: its media roots, resolved and sniffed
    records   item records and the builder of images linked with their captions
    read      `open_generation` and the read-only `Generation`
    write     writer transactions under the file lock (`append_items` allocates ids)
    commit    the atomic commit of one generation (temp folder, fsync, rename, CURRENT)
    work      an indexing job's resumable shards and its errors.jsonl
    faults    CLIPDEX_FAULT kill points for the crash tests (a no-op when unset)
"""

from retrieval.store.commit import StoreOptions
from retrieval.store.layout import FORMAT, current_name, keep_upload, read_current, upload_path
from retrieval.store.manifest import (
    GenerationManifest,
    external_model,
    read_generation_manifest,
)
from retrieval.store.read import Generation, open_generation, verify_generation
from retrieval.store.records import (
    PROVISIONAL_BASE,
    ItemRecord,
    NewImage,
    NewText,
    StreamedRecords,
    image_with_captions,
    linked_records,
    text_records,
)
from retrieval.store.work import (
    JobFolder,
    ParquetJobFolder,
    Shard,
    StagedRows,
    drop_stale_add_jobs,
    write_error_report,
)
from retrieval.store.write import Appended, append_items, update_generation, write_generation

__all__ = [
    "FORMAT",
    "PROVISIONAL_BASE",
    "Appended",
    "Generation",
    "GenerationManifest",
    "ItemRecord",
    "JobFolder",
    "NewImage",
    "NewText",
    "ParquetJobFolder",
    "Shard",
    "StagedRows",
    "StoreOptions",
    "StreamedRecords",
    "append_items",
    "current_name",
    "drop_stale_add_jobs",
    "external_model",
    "image_with_captions",
    "keep_upload",
    "linked_records",
    "open_generation",
    "read_current",
    "read_generation_manifest",
    "text_records",
    "update_generation",
    "upload_path",
    "verify_generation",
    "write_error_report",
    "write_generation",
]
