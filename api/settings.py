"""Service configuration: one frozen dataclass, filled from CLI arguments at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retrieval.batcher import BatcherConfig

MAX_K = 1000
MAX_TEXT_CHARS = 1000
MAX_LABELS = 100
MAX_MULTI_TERMS = 16
# Body caps of the JSON routes, from what they can accept (checked before parsing): a text
# query is 1,000 characters (at most 6 bytes each, JSON-escaped) and a few small fields; a
# vector is 4,096 numbers of at most ~25 characters each. Uploads get `max_body_bytes`.
TEXT_QUERY_BODY_BYTES = 64 * 1024
VECTOR_QUERY_BODY_BYTES = 256 * 1024
EMPTY_BODY_BYTES = 4 * 1024


@dataclass(frozen=True)
class Settings:
    index: Path | None = None  # the index root the indexer wrote (None: generation injected)
    model: str = "default"
    device: str = "auto"
    backend: str = "torch"  # torch, onnx or auto (`clipdex serve` passes its --backend)
    host: str = "127.0.0.1"
    port: int = 8000
    batching: BatcherConfig = field(default_factory=BatcherConfig)
    max_in_flight: int | None = 256  # requests inside the app at once, then 503; None: no cap
    admin_key: str | None = None  # None: write endpoints are disabled
    read_keys: tuple[str, ...] = ()  # empty: searching needs no key
    max_body_bytes: int = 10 * 1024 * 1024  # uploads; JSON routes declare smaller caps
    body_idle_s: float = 10.0  # a body that sends nothing this long gets 408
    body_deadline_s: float = 60.0  # a body not complete in this long gets 408
    max_buffered_bytes: int = 256 * 1024 * 1024  # all bodies being received at once
    max_image_pixels: int = 40_000_000
    # Peak bytes of one decode (raster + conversions): a 40 MP RGB photograph needs 320 MiB.
    max_decode_bytes: int = 384 * 1024 * 1024
    max_concurrent_decodes: int = 2  # uploads decoded at once (each up to max_decode_bytes)
    max_depth: int = 10_000  # deepest hit reachable by paging
    watch_seconds: float = 0.0  # >0: poll the index root for a new current generation
    retry_after_s: int = 1
    public_url: str = ""  # base of links in responses ("https://search.example"); "": relative
    index_name: str = "clipdex"  # the name clip-retrieval clients pass as indice_name

    def __repr__(self) -> str:  # keys never reach logs
        return (f"Settings(index={self.index}, model={self.model!r}, "
                f"backend={self.backend}, host={self.host}, "
                f"port={self.port}, batching={self.batching}, "
                f"max_in_flight={self.max_in_flight}, "
                f"admin_key={'set' if self.admin_key else 'unset'}, "
                f"read_keys={len(self.read_keys)})")
