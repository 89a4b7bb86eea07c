"""Which files a generation may serve (`retrieval.store.media`): the roots it records, inherited
by every generation derived from it, and a stored path checked after links and `..` are
resolved and the file sniffed as an image."""

from __future__ import annotations

import json
import os

import numpy as np

from retrieval.models.identity import ModelIdentity
from retrieval.store import ItemRecord, media, open_generation, update_generation, write_generation
from tests.conftest import make_image

DIM = 4
MODEL = ModelIdentity(sha256="cd" * 32, arch="synthetic", embed_dim=DIM)


def vectors(count: int) -> np.ndarray:
    rows = np.random.default_rng(count).normal(size=(count, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_roots_are_the_fewest_folders_that_hold_them_all(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    os.symlink(tmp_path / "c", tmp_path / "link")
    found = media.cover([tmp_path / "a" / "b", tmp_path / "a", tmp_path / "link"])
    assert found == [str(tmp_path / "a"), str(tmp_path / "c")]


def test_derived_generations_inherit_the_roots_and_add_their_own(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    photo = make_image(first / "red.png", (200, 30, 30))
    other = make_image(second / "blue.png", (30, 30, 200))
    root = tmp_path / "index"
    write_generation(root, MODEL, [ItemRecord(1, "image", path=str(photo))],
                     {"image": vectors(1)}, media_roots=[first])
    update_generation(root, MODEL, add=[ItemRecord(2, "image", path=str(other))],
                      add_vectors={"image": vectors(1)}, media_roots=[second])
    update_generation(root, MODEL, delete_ids=[1])
    with open_generation(root) as generation:
        assert generation.media_roots == [str(first.resolve()), str(second.resolve())]
        assert generation.image_file(str(other)) == (other.resolve(), "image/png")
        assert generation.image_file(str(second / ".." / "second" / "blue.png")) is not None
        assert generation.image_file("/etc/hostname") is None
        assert generation.image_file(str(second / ".." / ".." / "etc" / "hostname")) is None


def test_a_generation_written_before_roots_serves_its_build_folders(tmp_path):
    folder = tmp_path / "photos"
    photo = make_image(folder / "red.png", (200, 30, 30))
    data = {"build": {"sources": [str(folder), str(tmp_path / "captions.csv")]}}
    assert media.recorded_roots(data) == [str(folder.resolve())]
    assert media.recorded_roots({"build": {"from_embeddings": str(folder)}}) == []
    assert media.servable(tmp_path, str(photo), media.recorded_roots(data)) is not None
    (folder / "page.png").write_text(json.dumps({"not": "an image"}))
    assert media.servable(tmp_path, str(folder / "page.png"), [folder]) is None
