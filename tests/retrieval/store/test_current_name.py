"""CURRENT and generation names are plain names, never paths: a CURRENT that holds anything
but a generation name is a corrupt index (a typed error, whatever its length), a generation
asked for by a path-like name is not found, and a writer replaces a garbled CURRENT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import IndexCorruptError, IndexNotFoundError
from retrieval.models.identity import ModelIdentity
from retrieval.store import (
    ItemRecord,
    current_name,
    layout,
    open_generation,
    read_current,
    read_generation_manifest,
    verify_generation,
    write_generation,
)

DIM = 4
MODEL = ModelIdentity(sha256="c3" * 32, arch="synthetic", embed_dim=DIM)
GARBLED = ["../generations/000001", "../../../../etc", "/etc", "000001/../000001", "0" * 5000,
           "000001 000002", "٣", "generations/000001", "000001\x00"]


def write(root: Path) -> str:
    vectors = np.eye(DIM, dtype=np.float32)[:3]
    return write_generation(root, MODEL, [ItemRecord(i, "image", metadata={"n": i})
                                          for i in range(3)], {"image": vectors})


def point(root: Path, text: str) -> None:
    layout.current_file(root).write_text(text)


@pytest.mark.parametrize("text", GARBLED)
def test_a_current_naming_no_generation_is_a_corrupt_index(tmp_path, text):
    root = tmp_path / "index"
    write(root)
    (tmp_path / "manifest.json").write_text("{}")  # what a path outside generations/ finds
    point(root, text + "\n")
    for read in (current_name, open_generation, read_generation_manifest, verify_generation):
        with pytest.raises(IndexCorruptError, match="not a generation name") as caught:
            read(root)
        assert len(str(caught.value)) < 400  # a 5,000-character name is not echoed whole
    assert read_current(root) == text[:layout.CURRENT_CHARS]  # the poller still sees a change
    repaired = write(root)  # a writer replaces the garbled pointer
    assert current_name(root) == repaired
    with open_generation(root) as generation:
        assert generation.name == repaired and generation.count("image") == 3


def test_a_path_like_generation_name_is_not_found(tmp_path):
    root = tmp_path / "index"
    name = write(root)
    for asked in (f"../generations/{name}", f"{name}/..", "..", "/tmp", "x" * 5000):
        with pytest.raises(IndexNotFoundError, match="generation names are digits"):
            open_generation(root, name=asked)
        with pytest.raises(IndexNotFoundError):
            verify_generation(root, name=asked)
    assert open_generation(root, name=name).count("image") == 3  # a plain name opens
