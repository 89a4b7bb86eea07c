"""Phones' photographs through the real service on loopback: a HEIC or an AVIF added with
POST /admin/items/image is kept, indexed and found by an image query (sent as a PNG or in
its own format), and one that declares a huge size is refused like any other bomb."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from PIL import Image

from retrieval.store.layout import upload_path
from tests.api.helpers import ADMIN, AUTH, keyed_service
from tests.support import formats

ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
MEDIA = {"HEIF": ("photo.heic", "image/heic"), "AVIF": ("photo.avif", "image/avif")}
KEPT_AS = {"HEIF": ".heic", "AVIF": ".avif"}  # the suffix an upload is kept under


@pytest.fixture(scope="module")
def server(tiny, index_root):
    with keyed_service(tiny, index_root) as running:
        yield running


def pattern(fmt: str) -> Image.Image:
    """A picture unlike the index's colour squares, and unlike the other format's: stripes
    for HEIC, a checkerboard for AVIF."""
    y, x = np.mgrid[0:48, 0:64]
    if fmt == "HEIF":
        on = (y // 6) % 2 == 0
        pixels = np.where(on[..., None], (250, 220, 40), (20, 20, 120))
    else:
        on = ((x // 8) + (y // 8)) % 2 == 0
        pixels = np.where(on[..., None], (240, 240, 240), (160, 20, 90))
    return Image.fromarray(pixels.astype(np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    return formats.encoded(image, fmt, **({"quality": 90} if fmt != "PNG" else {}))


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_an_uploaded_phone_photo_is_indexed_and_found_by_an_image_query(server, index_root,
                                                                       fmt):
    name, media_type = MEDIA[fmt]
    data = encoded(pattern(fmt), fmt)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        added = http.post("/admin/items/image", headers=ADMIN_AUTH,
                          files={"image": (name, data, media_type)},
                          data={"captions": [f"a {fmt} pattern"]})
        assert added.status_code == 200, added.text
        item = added.json()["ids"][0]
        queries = {"PNG": ("q.png", encoded(pattern(fmt), "PNG"), "image/png"),
                   fmt: (name, data, media_type)}
        for query in queries.values():
            hits = http.post("/search/image", headers=AUTH, files={"image": query},
                             data={"k": "1", "target": "image"}).json()["hits"]
            assert hits[0]["id"] == item and hits[0]["score"] > 0.98, hits
        again = http.post("/admin/items/image", headers=ADMIN_AUTH,
                          files={"image": (name, data, media_type)})
        served = http.get(f"/items/{item}/image", headers=AUTH)
    assert served.status_code == 200 and served.content == data
    assert served.headers["content-type"] == {"HEIF": "image/heic", "AVIF": "image/avif"}[fmt]
    assert again.json()["duplicate"] is True and again.json()["ids"] == [item]
    assert (index_root / upload_path(data, KEPT_AS[fmt])).read_bytes() == data


def test_a_heic_declaring_a_huge_size_is_refused_with_413(server):
    data = bytearray(encoded(pattern("HEIF"), "HEIF"))
    position = data.find(b"ispe")
    data[position + 8:position + 16] = (30000).to_bytes(4, "big") + (20000).to_bytes(4, "big")
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        answer = http.post("/search/image",
                           files={"image": ("bomb.heic", bytes(data), "image/heic")})
    assert answer.status_code == 413, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert "30000x20000" in answer.json()["detail"]
