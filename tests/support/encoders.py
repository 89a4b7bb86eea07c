"""A model stand-in with the real `QueryEncoder` interface, for tests whose subject is not the
model: each input's embedding is looked up in a table the test wrote."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from retrieval.search.calibration import Calibration
from retrieval.search.query_encoders import ImageLike


class TableEncoder:
    """retrieval.search.query_encoders.QueryEncoder over a table of (d,) vectors: a text is
    looked up by its string, an image by its encoded bytes; a missing input is a KeyError."""

    logit_scale = 100.0  # CLIP's softmax scale
    model_sha256 = None  # no model: a Searcher checks no index's model against it

    def __init__(self, table: Mapping[str | bytes, np.ndarray],
                 calibrations: dict[str, Calibration] | None = None):
        self.table = dict(table)
        self.embed_dim = len(next(iter(self.table.values())))
        self.calibrations = calibrations or {}  # direction -> relevance fit

    def _rows(self, keys: Sequence[str | bytes]) -> np.ndarray:  # (n, d) float32
        rows = [np.asarray(self.table[key], dtype=np.float32) for key in keys]
        return np.stack(rows) if rows else np.zeros((0, self.embed_dim), np.float32)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._rows(list(texts))

    def images(self, images: Sequence[ImageLike]) -> np.ndarray:
        return self._rows([bytes(image) for image in images])  # a PIL image: TypeError
