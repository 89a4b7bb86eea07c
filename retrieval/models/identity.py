"""A model's identity in an index: the fingerprint an index records at build time and checks
at open time, so an index is never queried with vectors from another model.

A model clipdex loads is known by its checkpoint's SHA-256 (or a hash of its weights);
embeddings made outside clipdex carry an external identity, known only by the model's name.
This module imports no torch until a fingerprint has to hash weights, so the store can read
identities cheaply.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelIdentity:
    sha256: str
    arch: str
    embed_dim: int
    external: bool = False  # embeddings made elsewhere by a model clipdex cannot load


def external_identity(name: str, embed_dim: int) -> ModelIdentity:
    """The identity of a model outside clipdex, known only by name: its fingerprint hashes
    the name, so no loaded model matches it and two imports under one name do."""
    digest = hashlib.sha256(f"external:{name}".encode()).hexdigest()
    return ModelIdentity(digest, name, int(embed_dim), external=True)


def external_note(model: ModelIdentity) -> str:
    """What an index of external embeddings cannot answer, and what it can."""
    return (f"this index holds embeddings made outside clipdex by the model {model.arch!r} "
            f"(embed_dim {model.embed_dim}); text and image queries, and new texts and "
            "images, need that model, which clipdex cannot load; queries by vector (made by "
            "that model) or by item id work")


def model_fingerprint(clip: Any) -> str:
    """The checkpoint's SHA-256 when it has a card; else a hash of arch, init and weights,
    so two random-weight models never pass for one another."""
    if clip.card.get("sha256"):
        return str(clip.card["sha256"])
    import torch

    digest = hashlib.sha256(json.dumps({"arch": clip.arch, "init": clip.init}).encode())
    for name, tensor in sorted(clip.model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def model_identity(clip: Any) -> ModelIdentity:
    return ModelIdentity(model_fingerprint(clip), clip.arch, int(clip.embed_dim))
