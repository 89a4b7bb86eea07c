"""An item record becomes a response in one place (`api.responses`): a search hit, a listed
or looked-up item and a clip-retrieval result show the same item the same way."""

from __future__ import annotations

from api.responses import browse_response, hit_body, item_body, knn_results
from retrieval.search.searcher import Hit, Result
from retrieval.store import ItemRecord

PHOTO = ItemRecord(3, "image", path="/srv/photos/red.png", captions=["a red square"],
                   metadata={"label": "red", "source": "/srv/photos/red.png"})
CAPTION = ItemRecord(7, "text", text="a red square", image_id=3)
RANKING = ("score", "vector_rank", "keyword_rank", "relevance", "duplicates")


def test_a_hit_is_its_item_plus_how_it_ranked():
    for record in (PHOTO, CAPTION, None):
        item_id = record.id if record else 11
        hit = hit_body(Hit(item_id, 0.5, record, vector_rank=2, keyword_rank=1,
                           relevance=0.9, duplicates=(12,)), "https://x.test/")
        item = item_body(item_id, record, "https://x.test/")
        assert hit.model_dump(exclude=set(RANKING)) == item.model_dump(exclude=set(RANKING))
        assert (hit.score, hit.vector_rank, hit.duplicates) == (0.5, 2, [12])
        assert (item.score, item.vector_rank, item.duplicates) == (None, None, [])


def test_items_link_their_image_and_show_no_server_path():
    photo, caption = item_body(3, PHOTO, "https://x.test/"), item_body(7, CAPTION, "")
    assert photo.image_url == "https://x.test/items/3/image"
    assert photo.metadata == {"label": "red", "source": "red.png"}
    assert caption.image_url == "/items/3/image" and caption.text == "a red square"
    assert item_body(11, None, "").model_dump(exclude_defaults=True) == {"id": 11}


def test_a_listing_shows_items_without_scores():
    listing = browse_response(Result([Hit(3, None, PHOTO), Hit(7, None, CAPTION)], "g1",
                                     "next", 1.5), "")
    assert [hit.model_dump() for hit in listing.hits] == [
        item_body(3, PHOTO, "").model_dump(), item_body(7, CAPTION, "").model_dump()]
    assert (listing.generation, listing.next_cursor, listing.took_ms) == ("g1", "next", 1.5)


def test_a_clip_retrieval_result_is_the_hit_in_its_shape():
    hits = [Hit(7, 0.25, CAPTION), Hit(3, 0.5, PHOTO, duplicates=(4,))]
    assert knn_results(Result(hits, "g1", None, 1.0), "") == [
        {"id": 7, "similarity": 0.25, "url": "/items/3/image", "caption": "a red square"},
        {"label": "red", "source": "red.png", "id": 3, "similarity": 0.5,
         "url": "/items/3/image", "caption": "a red square", "duplicates": [4]}]
