"""clipdex's core: load a dual encoder, encode texts and images, search index generations.

    from retrieval import Query, open_index

    with open_index("pictures.idx") as index:  # loads the bundled model that built it
        for hit in index.search(Query.text("a dog on the beach", k=5)).hits:
            print(hit.score, hit.item.path)

The names below are the public surface; everything else is an implementation module. They
are loaded on first use, so `import retrieval` stays cheap (torch loads with the model).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # models and encoding
    "ClipModel": "retrieval.models.clip",
    "load_model": "retrieval.models.loading",
    "encode_texts": "retrieval.models.inference",
    "encode_images": "retrieval.models.inference",
    "encode_image_batch": "retrieval.models.inference",
    "encode_token_batch": "retrieval.models.inference",
    "QueryEncoder": "retrieval.search.query_encoders",
    "ModelEncoder": "retrieval.search.query_encoders",
    "BatchedEncoder": "retrieval.search.query_encoders",
    "MicroBatcher": "retrieval.search.batcher",
    "BatcherConfig": "retrieval.search.batcher",
    "load_image": "retrieval.inputs.images",
    "DecodeLimits": "retrieval.inputs.images",
    # an index and its model
    "Index": "retrieval.index",
    "open_index": "retrieval.index",
    "Added": "retrieval.index",
    # queries
    "Query": "retrieval.search.query",
    "Term": "retrieval.search.query",
    "Listing": "retrieval.search.query",
    "Searcher": "retrieval.search.searcher",
    "Hit": "retrieval.search.searcher",
    "Result": "retrieval.search.searcher",
    # the index store
    "open_generation": "retrieval.store",
    "write_generation": "retrieval.store",
    "update_generation": "retrieval.store",
    "append_items": "retrieval.store",
    "ItemRecord": "retrieval.store",
    "Generation": "retrieval.store",
    "model_identity": "retrieval.models.identity",
    # errors
    "ClipdexError": "retrieval.errors",
}
__all__ = ["Added", "BatchedEncoder", "BatcherConfig", "ClipModel", "ClipdexError",
    "DecodeLimits", "Generation", "Hit", "Index", "ItemRecord", "Listing", "MicroBatcher",
    "ModelEncoder", "Query", "QueryEncoder", "Result", "Searcher", "Term", "append_items",
    "encode_image_batch", "encode_images", "encode_texts", "encode_token_batch", "load_image",
    "load_model", "model_identity", "open_generation", "open_index", "update_generation",
    "write_generation"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
