"""Typed errors of the retrieval core; the CLI and the API translate them at the edges.

ClipdexError
 ├── ModelLoadError      a model spec, checkpoint or model card cannot be loaded
 ├── ManifestError       a manifest file or one of its columns is unusable
 ├── BadImageError       one image cannot be decoded (callers skip and report it)
 │    ├── ImageTooLargeError    over the pixel or decoded-bytes cap (a service answers 413)
 │    └── UnsupportedImageError a format the caller does not accept (a service answers 415)
 ├── CheckpointError     a training checkpoint cannot be written or resumed
 ├── EngineError         the distributed engine (Ray) cannot start, join or run a job
 ├── IndexStoreError     an index directory cannot be read or written
 │    ├── IndexNotFoundError   no index (no CURRENT generation) at the path
 │    ├── IndexCorruptError    a generation file is missing or fails its checksum or counts
 │    ├── IndexMismatchError   the index was built with another model or dimension
 │    │    └── ExternalModelError  its embeddings came from a model clipdex cannot load
 │    │                            (vector and item queries only)
 │    ├── UnknownItemError     an item id that the index does not hold (or was deleted)
 │    └── DuplicateItemError   an image whose stored path is already a live item
 │                             (`item_id` names it)
 ├── QueryTimeoutError   a statement on the items table ran past its time limit, or was
 │                       interrupted because its generation was closed
 └── InvalidQueryError   a query array or modality the index cannot answer
      ├── FilterError         a metadata filter that is malformed, names an unknown field or
      │                       gives a value of the wrong type (`field`, `field_type` say which)
      ├── MetadataError       item metadata holding a value no field can store (`field` says
      │                       which key)
      ├── BadCursorError      a paging cursor that was not issued for this query (or tampered)
      ├── StaleCursorError    a cursor issued by another generation of the index
      └── TooDeepError        paging past the deepest hit a searcher serves
"""

from __future__ import annotations


class ClipdexError(Exception):
    """Base of every error clipdex raises on purpose."""


class ModelLoadError(ClipdexError):
    pass


class ManifestError(ClipdexError):
    pass


class BadImageError(ClipdexError):
    pass


class ImageTooLargeError(BadImageError):
    pass


class UnsupportedImageError(BadImageError):
    pass


class CheckpointError(ClipdexError):
    pass


class EngineError(ClipdexError):
    pass


class IndexStoreError(ClipdexError):
    pass


class IndexNotFoundError(IndexStoreError):
    pass


class IndexCorruptError(IndexStoreError):
    pass


class IndexMismatchError(IndexStoreError):
    pass


class ExternalModelError(IndexMismatchError):
    pass


class UnknownItemError(IndexStoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateItemError(IndexStoreError):
    """`item_id` is the live item that already holds the path."""

    def __init__(self, message: str, item_id: int):
        super().__init__(message)
        self.item_id = item_id


class QueryTimeoutError(ClipdexError):
    pass


class InvalidQueryError(ClipdexError, ValueError):
    pass


class FilterError(InvalidQueryError):
    """`field` names the filter's field at fault (None for a malformed filter) and
    `field_type` its type in the generation (None when the field is unknown)."""

    def __init__(self, message: str, field: str | None = None, field_type: str | None = None):
        super().__init__(message)
        self.field, self.field_type = field, field_type


class MetadataError(InvalidQueryError):
    """`field` names the metadata key at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class BadCursorError(InvalidQueryError):
    pass


class StaleCursorError(InvalidQueryError):
    pass


class TooDeepError(InvalidQueryError):
    pass
