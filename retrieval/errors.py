"""Typed errors of the retrieval core; the CLI and the API translate them at the edges.

ClipdexError
 ├── ModelLoadError      a model spec, checkpoint or model card cannot be loaded
 ├── ManifestError       a manifest file or one of its columns is unusable
 ├── BadImageError       one image cannot be decoded (callers skip and report it)
 └── CheckpointError     a training checkpoint cannot be written or resumed
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


class CheckpointError(ClipdexError):
    pass
