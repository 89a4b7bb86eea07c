"""Service configuration: one frozen pydantic-settings object, read at the edge.

Every field can come from the environment with the `CLIPDEX_` prefix (`CLIPDEX_PORT=9000`,
`CLIPDEX_ADMIN_KEY`, `CLIPDEX_READ_KEYS=k1,k2`); values passed explicitly (the CLI's flags, a
test's arguments) win over the environment. The micro-batcher's fields are nested under
`batching`, one variable each after a double underscore (`CLIPDEX_BATCHING__MAX_BATCH=8`,
`CLIPDEX_BATCHING__MAX_WAIT_MS`, `CLIPDEX_BATCHING__QUEUE_SIZE`,
`CLIPDEX_BATCHING__MAX_QUEUE_WAIT_MS`) or as one JSON object (`CLIPDEX_BATCHING='{"max_batch":
8}'`). `clipdex serve` takes what neither a flag nor the environment sets from the defaults
here, except three it derives: the batch size from the device, the requests in flight from
the batch size, and the backend (auto). Keys are `SecretStr`: they never reach a repr, a log
line or a traceback.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from retrieval.search.batcher import BatcherConfig

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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIPDEX_", env_nested_delimiter="__",
                                      frozen=True)

    index: Path | None = None  # the index root the indexer wrote (None: generation injected)
    model: str = "default"
    device: str = "auto"
    backend: str = "torch"  # torch, onnx or auto (`clipdex serve` passes its --backend)
    host: str = "127.0.0.1"
    port: int = 8000
    batching: BatcherConfig = Field(default_factory=BatcherConfig)
    max_in_flight: int | None = 256  # requests inside the app at once, then 503; 0/None: no cap
    admin_key: SecretStr | None = None  # None: write endpoints are disabled
    # empty: searching needs no key; from the environment, comma-separated
    read_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    max_body_bytes: int = 10 * 1024 * 1024  # uploads; JSON routes declare smaller caps
    body_idle_s: float = 10.0  # a body that sends nothing this long gets 408
    body_deadline_s: float = 60.0  # a body not complete in this long gets 408
    max_buffered_bytes: int = 256 * 1024 * 1024  # all bodies being received at once
    # Connections (api/server.py): in all (None: the file-descriptor limit less 160) and from
    # one address (0 or None: no cap; behind a reverse proxy every client has its address).
    # Past either cap, `reserved_connections` more are let in for one health check or keyed
    # request each.
    max_connections: int | None = None
    max_connections_per_address: int | None = 256
    reserved_connections: int = 32
    refused_drain_s: float = 5.0  # a refused request's body is read and dropped this long
    max_image_pixels: int = 40_000_000
    # Peak bytes of one decode (raster + conversions): a 40 MP RGB photograph needs 320 MiB.
    max_decode_bytes: int = 384 * 1024 * 1024
    max_concurrent_decodes: int = 2  # uploads decoded at once (each up to max_decode_bytes)
    # A request's images must be decoded within this; past it the request gets 413 and the
    # decode is abandoned (it keeps its slot until it ends; `retrieval.inputs.imagecost` bounds it)
    decode_deadline_s: float = 2.0
    # The heap (`retrieval.heap`): malloc arenas the request threads share, and how often
    # freed memory is handed back when resident memory grew (0: never)
    malloc_arenas: int = 4
    heap_trim_s: float = 2.0
    max_depth: int = 10_000  # deepest hit reachable by paging
    # One statement on the items table (filters, browse, keywords, lookups); past it 503
    query_seconds: float = 10.0
    watch_seconds: float = 0.0  # >0: poll the index root for a new current generation
    retry_after_s: int = 1
    public_url: str = ""  # base of links in responses ("https://search.example"); "": relative
    index_name: str = "clipdex"  # the name clip-retrieval clients pass as indice_name

    @field_validator("read_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """`CLIPDEX_READ_KEYS=a, b,` is two keys: blanks and empty entries are dropped."""
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("max_in_flight")
    @classmethod
    def _zero_is_no_cap(cls, value: int | None) -> int | None:
        """0 turns the cap off, as `--max-in-flight 0` does."""
        return value or None

    @field_validator("batching")
    @classmethod
    def _zero_wait_is_off(cls, value: BatcherConfig) -> BatcherConfig:
        """A queue-wait budget of 0 turns it off, as `--max-queue-wait-ms 0` does."""
        if value.max_queue_wait_ms == 0:
            return dataclasses.replace(value, max_queue_wait_ms=None)
        return value

    @field_validator("admin_key", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    def admin_secret(self) -> str | None:
        """The admin key's text, for the one comparison that needs it (api/deps.py)."""
        return self.admin_key.get_secret_value() if self.admin_key else None

    def read_secrets(self) -> list[str]:
        return [key.get_secret_value() for key in self.read_keys]
