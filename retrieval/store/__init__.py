"""The on-disk index store: one package owns the format (see `read`); `write` makes new
generations. Import everything from `retrieval.store`."""

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
from retrieval.store.write import update_generation, write_generation

__all__ = [
    "FORMAT", "MODALITIES", "Generation", "ItemRecord", "ModelIdentity", "StoreOptions",
    "current_name", "maybe_fault", "model_fingerprint", "model_identity", "open_generation",
    "update_generation", "write_generation",
]
