"""The on-disk index store: one package owns the format (see `read`); `write` makes new
generations. Import everything from `retrieval.store`."""

from retrieval.store.layout import keep_upload, resolve_stored, upload_path
from retrieval.store.read import (
    FORMAT,
    MODALITIES,
    Generation,
    ItemRecord,
    ModelIdentity,
    StoreOptions,
    current_name,
    maybe_fault,
    model_fingerprint,
    model_identity,
    open_generation,
)
from retrieval.store.write import Appended, append_items, update_generation, write_generation

__all__ = [
    "FORMAT",
    "MODALITIES",
    "Appended",
    "Generation",
    "ItemRecord",
    "ModelIdentity",
    "StoreOptions",
    "append_items",
    "current_name",
    "keep_upload",
    "maybe_fault",
    "model_fingerprint",
    "model_identity",
    "open_generation",
    "resolve_stored",
    "update_generation",
    "upload_path",
    "write_generation",
]
