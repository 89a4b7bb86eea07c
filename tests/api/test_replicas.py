"""Serving beyond one process: replicas that read one index directory and follow its CURRENT
(`--watch`) need no coordination, because a generation never changes once CURRENT names it.
Two services on loopback watch the same root while a writer commits generation after
generation; every answer must come whole from one committed generation."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np

from api.app import create_app
from api.settings import Settings
from retrieval.models.identity import model_identity
from retrieval.models.inference import encode_images
from retrieval.store import ItemRecord, update_generation
from tests.api.helpers import ServerThread, build_index
from tests.conftest import COLOURS, make_image

NEW_GENERATIONS = 4


def _commit_generations(root, tiny, tmp_path, written: dict[str, int]) -> None:
    """Add one image per generation, recording each generation's image count."""
    colours = list(COLOURS.items())[2:2 + NEW_GENERATIONS]
    for offset, (name, colour) in enumerate(colours):
        image = make_image(tmp_path / f"new-{name}.png", colour)
        generation = update_generation(root, model_identity(tiny), add=[ItemRecord(
            100 + offset, "image", path=str(image.resolve()))], add_vectors={
            "image": encode_images(tiny, [image]), "text": np.zeros((0, tiny.embed_dim))})
        written[generation] = 3 + offset
        time.sleep(0.15)  # let the replicas' watchers (0.1 s) see some generations singly


def _ask(http: httpx.Client) -> tuple[str, int]:
    """(generation, number of image hits) of a query that asks for every image."""
    answer = http.post("/search/text", json={"text": "a square", "k": 50})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body["generation"], len(body["hits"])


def test_two_replicas_follow_current_and_answer_only_from_whole_generations(tiny, tmp_path):
    images = {name: make_image(tmp_path / f"{name}.png", COLOURS[name]) for name in ("red", "blue")}
    root = build_index(tmp_path / "index", tiny, images)
    written = {"000001": 2}  # generation -> images in it
    settings = Settings(index=root, watch_seconds=0.1)
    with ServerThread(create_app(settings, clip=tiny)) as first, \
            ServerThread(create_app(settings, clip=tiny)) as second, \
            httpx.Client(base_url=first.url, timeout=30) as one, \
            httpx.Client(base_url=second.url, timeout=30) as two:
        writer = threading.Thread(target=_commit_generations, args=(root, tiny, tmp_path, written))
        writer.start()
        seen: list[tuple[str, int]] = []
        while writer.is_alive():
            seen += [_ask(one), _ask(two)]
        writer.join()
        final = max(written)
        deadline = time.monotonic() + 20
        while {_ask(one)[0], _ask(two)[0]} != {final} and time.monotonic() < deadline:
            time.sleep(0.05)
        seen += [_ask(one), _ask(two)]

    assert [answer for answer in seen[-2:]] == [(final, written[final])] * 2
    assert len(written) == NEW_GENERATIONS + 1
    # every answer names a committed generation and holds exactly that generation's images
    for generation, hits in seen:
        assert generation in written and hits == written[generation], (generation, hits)
    assert len({generation for generation, _ in seen}) >= 2  # they moved while answering
