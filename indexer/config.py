"""What an indexing job is asked to do (`BuildConfig`, and `RayConfig` for where it encodes)
and what it reports (`Summary`).

Their own module, free of torch and the model code, so that importing precomputed embeddings
(`indexer.external_embeddings`) never loads what only encoding needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from retrieval.ann.ondisk import BlockFiller, fill_here
from retrieval.inputs.images import DEFAULT_MAX_PIXELS
from retrieval.store import StoreOptions


@dataclass(frozen=True)
class BuildConfig:
    batch_size: int = 64
    workers: int | None = None  # image decoding processes (None: up to 4)
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_size: int = 2048
    max_memory: str = "4GB"
    index_kind: str | None = None
    precision: str = "auto"
    target_recall: float | None = None  # None: the index's recorded one, else tuning's 0.95

    def store_options(self, fill_blocks: BlockFiller = fill_here) -> StoreOptions:
        """The store's options; `fill_blocks` runs an on-disk index's blocks (`--engine ray`:
        `indexer.ray_build.fill_on_ray`)."""
        return StoreOptions(max_memory=self.max_memory, index_kind=self.index_kind,
                            fill_blocks=fill_blocks, target_recall=self.target_recall)


DEFAULT_CONFIG = BuildConfig()  # frozen: one shared default for every job's signature


@dataclass
class Summary:
    generation: str
    images: int
    texts: int
    skipped: dict[str, int] = field(default_factory=dict)  # by reason
    shards_resumed: int = 0
    shards_encoded: int = 0
    shards_read: int = 0  # shards of precomputed embeddings (--from-embeddings)
    seconds: float = 0.0
    errors_file: str | None = None
    tuning: dict[str, Any] = field(default_factory=dict)
    # imported image paths outside the --media-root folders: kept as metadata, never served
    outside_media_roots: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RayConfig:
    """Where the encoding runs (the `--engine ray` flags)."""

    ray_address: str | None = None  # None: start Ray here; "auto", "ray://host:port": join
    num_encoders: int = 1  # encoder actors, each with its own copy of the model
    gpus_per_encoder: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_encoder: float = 1.0
