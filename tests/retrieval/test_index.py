"""The facade: an index opened with the model it needs, searched, added to and deleted from,
as a script would use it (real model forward passes, a real FAISS index and SQLite file)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval import Query, open_index
from retrieval.errors import (
    DuplicateItemError,
    ExternalModelError,
    IndexMismatchError,
    ModelLoadError,
)
from retrieval.index import delete_items
from retrieval.models.identity import ModelIdentity, external_identity, model_identity
from retrieval.models.inference import encode_texts
from retrieval.models.loading import BUNDLED, bundled_spec_for, load_model
from retrieval.store import ItemRecord, read_current, write_generation
from retrieval.store.records import text_records

CAPTIONS = ["a red square", "a blue circle", "a green triangle"]


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def index_root(tmp_path: Path, tiny) -> Path:
    """Three captions encoded by the tiny model: the index records that model's identity."""
    root = tmp_path / "index"
    write_generation(root, model_identity(tiny), text_records(CAPTIONS, start_id=0),
                     {"text": encode_texts(tiny, CAPTIONS)})
    return root


def test_a_text_query_finds_its_own_caption(index_root, tiny):
    with open_index(index_root, tiny) as index:
        hits = index.search(Query.text("a blue circle", target="text", k=3)).hits
        assert hits[0].item.text == "a blue circle"
        assert index.info() == {"model": tiny.arch, "embed_dim": tiny.embed_dim,
                                "generation": index.name, "images": 0, "texts": 3}


def test_added_texts_are_searchable_at_once_and_deleted_ones_are_gone(index_root, tiny):
    with open_index(index_root, tiny) as index:
        first = index.name
        added = index.add_texts(["a yellow star"], metadata={"album": "shapes"})
        assert added.generation == index.name == read_current(index_root) != first
        hit = index.search(Query.text("a yellow star", target="text", k=1)).hits[0]
        assert hit.id == added.ids[0] and hit.item.metadata == {"album": "shapes"}
        index.delete(added.ids)
        ids = {h.id for h in index.search(Query.text("a yellow star", target="text", k=10)).hits}
        assert added.ids[0] not in ids and index.info()["texts"] == 3


def test_an_image_is_kept_by_content_and_the_same_bytes_are_the_same_item(index_root, tiny):
    red = png((200, 30, 30))
    with open_index(index_root, tiny) as index:
        added = index.add_image(red, captions=["a red photo", "  "])
        assert len(added.ids) == 2 and not added.duplicate  # the image and one caption
        image = index.item(added.ids[0])
        assert image.path.startswith("uploads/") and (index_root / image.path).read_bytes() == red
        again = index.add_image(red)
        assert again.ids == added.ids[:1] and again.duplicate and again.generation == index.name
        with pytest.raises(DuplicateItemError, match=f"image_id {added.ids[0]}"):
            index.add_image(red, captions=["another caption"])  # refused, not dropped
        assert index.info()["images"] == 1


def test_a_shared_index_does_not_follow_its_writes(index_root, tiny):
    """The service's index: many requests hold it, so a write names the new generation and
    the service swaps it in; the Index keeps serving what its readers hold."""
    with open_index(index_root, tiny, follow_writes=False) as index:
        served = index.name
        added = index.add_texts(["a purple hexagon"])
        assert index.name == served != added.generation == read_current(index_root)
    with open_index(index_root, tiny) as fresh:
        assert fresh.item(added.ids[0]).text == "a purple hexagon"


def test_another_models_index_is_refused(index_root):
    other = load_model("clipdex-tiny", device="cpu")
    with torch.no_grad():  # same architecture and size, other weights: it would answer nonsense
        next(other.model.parameters()).add_(0.01)
    with pytest.raises(IndexMismatchError):
        open_index(index_root, other)


def test_an_index_names_the_bundled_model_that_built_it_or_asks_for_one(index_root):
    default_sha = json.loads(BUNDLED["default"].with_suffix(".card.json").read_text())["sha256"]
    assert bundled_spec_for(ModelIdentity(default_sha, "any", 8)) == "default"
    with pytest.raises(ModelLoadError, match="not a bundled model: pass the model"):
        open_index(index_root)  # built by the tiny model, which nothing bundles


def test_external_embeddings_open_without_a_model_and_say_what_they_cannot_do(tmp_path):
    root, rng = tmp_path / "external", np.random.default_rng(0)
    vectors = rng.normal(size=(4, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [ItemRecord(i, "image", path=f"/photos/{i}.jpg") for i in range(4)]
    write_generation(root, external_identity("their-clip", 16), records, {"image": vectors})

    def never() -> None:
        raise AssertionError("an index of external embeddings needs no model loaded")

    with open_index(root, never) as index:
        hits = index.search(Query.vector(vectors[2].tolist(), k=1)).hits
        assert hits[0].id == 2 and index.info()["external_model"]
        for refused in (lambda: index.search(Query.text("a dog", k=1)),
                        lambda: index.add_texts(["a dog"]), lambda: index.delete([1])):
            with pytest.raises(ExternalModelError, match="their-clip"):
                refused()
    delete_items(root, ids=[1])  # the command line's delete needs no model at all
    with open_index(root) as index:
        assert index.info()["images"] == 3
