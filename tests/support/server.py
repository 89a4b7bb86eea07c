"""A real uvicorn server, with the service's own server config, running in a background
thread on a free loopback port: for tests of the service and of writers racing it."""

from __future__ import annotations

import threading
import time
from typing import Any, Self

import uvicorn

from api.server import ConnectionLimits, HeadLimits, server_config


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> while its `with` block runs."""

    def __init__(self, app: Any, limits: HeadLimits | None = None,
                 connections: ConnectionLimits | None = None):
        # The service's own server config (its request-head and connection limits included).
        config = server_config(app, "127.0.0.1", 0, limits or HeadLimits(),
                               connections or ConnectionLimits(), log_level="warning",
                               access_log=False, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
