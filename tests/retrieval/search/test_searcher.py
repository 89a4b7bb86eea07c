"""The core Searcher as a notebook uses it: a real generation from the store, the tiny model
through a direct encoder, whole queries in, pages and cursors out."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

import retrieval
from retrieval import ModelEncoder, Query, Searcher, Term, open_generation
from retrieval.errors import BadCursorError, InvalidQueryError, StaleCursorError, TooDeepError
from retrieval.search.cursor import Cursor, decode_cursor, encode_cursor
from tests.conftest import COLOURS, make_image
from tests.support.colours import build_index, colour_generation


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colours")
    return {name: make_image(folder / f"{name}.png", rgb) for name, rgb in COLOURS.items()}


@pytest.fixture(scope="module")
def searcher(tiny, images, tmp_path_factory):
    root = build_index(tmp_path_factory.mktemp("searcher") / "index", tiny, images)
    with open_generation(root) as generation:
        yield Searcher(generation, ModelEncoder(tiny), max_depth=20)


def test_the_public_surface_resolves():
    assert {"Searcher", "Query", "ModelEncoder", "load_model", "open_generation"} <= set(
        retrieval.__all__)
    assert all(getattr(retrieval, name) is not None for name in retrieval.__all__)
    assert retrieval.__all__ == sorted(retrieval._EXPORTS)


def test_pages_of_a_text_query_cover_its_ranking_once(searcher):
    whole = searcher.search(Query.text("a red square", k=20, target="text"))
    seen, cursor = [], None
    while True:
        page = searcher.search(Query.text("a red square", k=3, target="text", cursor=cursor))
        seen += [hit.id for hit in page.hits]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [hit.id for hit in whole.hits] and len(seen) == 16


def test_a_cursor_belongs_to_its_query_and_generation(searcher):
    page = searcher.search(Query.text("a red square", k=2))
    with pytest.raises(BadCursorError):
        searcher.search(Query.text("a blue square", k=2, cursor=page.next_cursor))
    with pytest.raises(BadCursorError):
        searcher.search(Query.text("a red square", k=2, threshold=0.5, cursor=page.next_cursor))
    fingerprint = Query.text("a red square").fingerprint()
    other = encode_cursor(Cursor("000099", fingerprint, (0.5, 3), 2))
    with pytest.raises(StaleCursorError):
        searcher.search(Query.text("a red square", k=2, cursor=other))
    with pytest.raises(TooDeepError):
        searcher.search(Query.text("a red square", k=19, cursor=page.next_cursor))


def test_a_stored_generation_answers_as_the_exact_oracle(searcher, tiny, images):
    exact = Searcher(colour_generation(tiny, images), ModelEncoder(tiny), max_depth=20)
    photo = images["blue"].read_bytes()
    for query in (Query.text("a red square", k=8), Query.text("a green square", k=16,
                                                                target="text"),
                  Query.image(photo, k=8), Query.image(photo, k=5, target="text")):
        stored, oracle = searcher.search(query).hits, exact.search(query).hits
        assert [hit.id for hit in stored] == [hit.id for hit in oracle]
        assert np.allclose([h.score for h in stored], [h.score for h in oracle], atol=1e-5)


@pytest.mark.parametrize("field,raw", [("n", "Infinity"), ("n", "1e400"), ("s", "NaN"),
                                       ("s", "1e400"), ("i", "-1"), ("i", "9" * 400),
                                       ("n", "true"), ("s", '"0.5"'), ("g", "null")])
def test_a_tampered_cursor_is_a_bad_cursor(field, raw):
    token = encode_cursor(Cursor("g1", "f1", (0.5, 3), 2))
    payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    text = json.dumps({**payload, field: "@"}).replace('"@"', raw)
    bad = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
    with pytest.raises(BadCursorError):
        decode_cursor(bad, "g1", "f1", max_served=100)
    for junk in ("", "!!!", "x" * 600, base64.urlsafe_b64encode(b"[1, 2]").decode()):
        with pytest.raises(BadCursorError):
            decode_cursor(junk, "g1", "f1", max_served=100)


def test_weighted_terms_and_items_combine(searcher):
    red = searcher.search(Query.text("a red square", k=1)).hits[0]
    more = searcher.search(Query((Term(item_id=red.id),), k=1)).hits[0]
    assert more.id == red.id and more.score == pytest.approx(1.0, abs=1e-5)
    steered = searcher.search(Query((Term(1.0, text="a red square"),
                                     Term(-0.5, item_id=red.id)), k=8)).hits
    assert steered[0].id != red.id
    with pytest.raises(InvalidQueryError):
        searcher.search(Query((Term(1.0, item_id=red.id), Term(-1.0, item_id=red.id))))


def test_classify_caption_and_image_queries_take_bytes_or_images(searcher, tiny):
    image = Image.new("RGB", (40, 40), COLOURS["blue"])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    ranked = searcher.classify(buffer.getvalue(), ["cat", "dog", "square"])
    assert [label for label, _ in ranked] and sum(p for _, p in ranked) == pytest.approx(1)
    captions = searcher.caption(image, k=3)
    assert len(captions) == 3 and all(hit.item.modality == "text" for hit in captions)
    by_bytes = searcher.search(Query.image(buffer.getvalue(), target="image", k=2)).hits
    by_image = searcher.search(Query.image(image, target="image", k=2)).hits
    assert [h.id for h in by_bytes] == [h.id for h in by_image]
    assert np.allclose([h.score for h in by_bytes], [h.score for h in by_image], atol=1e-4)


def test_a_searcher_without_an_encoder_answers_vectors_only(searcher):
    plain = Searcher(searcher.generation)
    vector = searcher.item_vector(1)
    assert plain.search(Query.vector(vector.tolist(), k=1)).hits[0].id == 1
    with pytest.raises(InvalidQueryError, match="no model"):
        plain.search(Query.text("a cat"))
