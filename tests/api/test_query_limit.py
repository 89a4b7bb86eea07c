"""A metadata statement that never ends, through a real service started as `clipdex serve`
starts it (no graceful-shutdown timeout): it holds up no other search, it is a 503 at the
statement time limit, and the service shuts down within that limit while one runs."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import numpy as np
import uvicorn

from api.app import create_app
from api.server import HeadLimits, server_config
from api.settings import Settings
from retrieval.store import fields, open_generation
from tests.api.helpers import ServerThread

LIMIT_S = 1.5  # the generation's statement time limit in this test
ENDLESS = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
           "SELECT count(*) FROM c")


class ServeThread(ServerThread):
    """The service as `clipdex serve` runs it: uvicorn waits for in-flight requests at
    shutdown, however long they take."""

    def __init__(self, app: Any):
        config = server_config(app, "127.0.0.1", 0, HeadLimits(), log_level="warning",
                               access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def browse_in_background(url: str, outcome: dict[str, Any]) -> threading.Thread:
    def browse() -> None:
        started = time.monotonic()
        try:
            outcome["response"] = httpx.post(f"{url}/search/browse", json={"k": 3}, timeout=60)
        except httpx.HTTPError as error:  # the server went away: also an end
            outcome["response"] = error
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=browse, daemon=True)
    thread.start()
    time.sleep(0.5)  # its statement is running
    return thread


def test_an_endless_statement_is_a_503_holds_up_nothing_and_ends_at_shutdown(
        tiny, index_root, monkeypatch):
    monkeypatch.setattr(fields, "listing_sql", lambda *args: (ENDLESS, []))  # every browse
    generation = open_generation(index_root, query_seconds=LIMIT_S)
    server = ServeThread(create_app(Settings(index=index_root), clip=tiny, generation=generation))
    with server:
        first: dict[str, Any] = {}
        browsing = browse_in_background(server.url, first)
        red = {"field": "label", "eq": "red"}
        vector = np.ones(tiny.embed_dim).tolist()
        found = httpx.post(f"{server.url}/search/vector", json={"vector": vector, "k": 5,
                                                                "filter": red}, timeout=60)
        assert found.status_code == 200, found.text
        assert [hit["metadata"]["label"] for hit in found.json()["hits"]] == ["red"]
        assert browsing.is_alive()  # the search did not wait for the browse
        browsing.join(timeout=60)
        response = first["response"]
        assert response.status_code == 503, response.text
        assert response.json()["title"] == "Query timed out"
        assert LIMIT_S - 0.5 < first["seconds"] < LIMIT_S + 10

        second: dict[str, Any] = {}
        browse_in_background(server.url, second)
        stopping = time.monotonic()
        server.server.should_exit = True
        server.thread.join(timeout=LIMIT_S + 20)
        assert not server.thread.is_alive(), "shutdown waited on the statement"
        assert time.monotonic() - stopping < LIMIT_S + 10
    generation.close()
