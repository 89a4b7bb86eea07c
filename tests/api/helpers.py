"""The service tests' own helpers: keyed services, waiting for a generation to be served,
and raw sockets. The exact in-memory generation, the colour corpus and the server thread are
shared with the core's tests from tests/support, and re-exported here."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from retrieval.store import ItemRecord
from tests.support.colours import build_index, colour_generation, colour_records
from tests.support.oracles import InMemoryGeneration
from tests.support.server import ServerThread

__all__ = ["InMemoryGeneration", "ItemRecord", "ServerThread", "build_index",
           "colour_generation", "colour_records", "raw_socket", "read_response", "status_of",
           "wait_for_generation"]


READ, ADMIN = "reader-key", "admin-key"  # the keys the keyed test services are started with
AUTH = {"Authorization": f"Bearer {READ}"}


def keyed_service(tiny: Any, root: Path, **settings: Any) -> ServerThread:
    """A real server over `root` with the read and admin keys above and `settings`."""
    from api.app import create_app
    from api.settings import Settings

    options = {"read_keys": (READ,), "admin_key": ADMIN, **settings}
    return ServerThread(create_app(Settings(index=root, **options), clip=tiny))


def wait_for_generation(http: Any, name: str, timeout: float = 20) -> dict:
    """/readyz once the service serves generation `name` (AssertionError after `timeout`)."""
    deadline = time.monotonic() + timeout
    ready: dict = {}
    while time.monotonic() < deadline:
        ready = http.get("/readyz").json()
        if ready.get("generation") == name:
            return ready
        time.sleep(0.1)
    raise AssertionError(f"still serving {ready.get('generation')}, not {name}")


# --- raw sockets: what a hostile client sends and reads, byte for byte ---


def raw_socket(server: ServerThread) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_response(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes or stops for a moment."""
    sock.settimeout(limit_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data or not _complete(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    return data


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])
