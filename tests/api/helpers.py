"""An exact in-memory index generation (the store's interface) and a real uvicorn server
running in a background thread on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import uvicorn

from api.server import ConnectionLimits, HeadLimits, server_config
from retrieval.store import ItemRecord, NewImage, NewText, linked_records

__all__ = ["InMemoryGeneration", "ItemRecord", "ServerThread", "build_index",
           "colour_generation", "colour_records", "raw_socket", "read_response", "status_of",
           "wait_for_generation"]


class InMemoryGeneration:
    """retrieval.store.Generation's read interface over numpy arrays, searched exactly."""

    def __init__(self, name: str, embed_dim: int, records: Sequence[ItemRecord],
                 vectors: dict[str, np.ndarray], root: Path | None = None):
        self.name, self.embed_dim, self.root = name, embed_dim, root
        self.manifest: dict[str, Any] = {"name": name}
        self.model_sha256 = None
        self.closed = False
        self._records = {record.id: record for record in records}
        self._ids = {modality: np.array([r.id for r in records if r.modality == modality],
                                        dtype=np.int64) for modality in ("image", "text")}
        self._vectors = vectors  # modality -> (n, d) rows in the order of self._ids

    def count(self, modality: str) -> int:
        return len(self._ids[modality])

    def search(self, modality: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert not self.closed, "searched a closed generation"
        k = min(k, self.count(modality))
        scores = queries @ self._vectors[modality].T  # (nq, n)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(scores, order, 1).astype(np.float32),
                self._ids[modality][order])

    def items(self, ids: Sequence[int]) -> list[ItemRecord | None]:
        return [self._records.get(int(item_id)) for item_id in ids]

    def vectors(self, modality: str, ids: Sequence[int]) -> np.ndarray:
        rows = [int(np.flatnonzero(self._ids[modality] == item_id)[0]) for item_id in ids]
        return self._vectors[modality][rows]

    def fields(self) -> dict[str, str]:
        return {}  # no metadata fields: every filter names its field unknown

    def matching_ids(self, modality: str, where: Any) -> np.ndarray:
        raise AssertionError("no filter can pass an empty field list")

    def listing(self, modality: str, where: Any, order: Any, descending: bool, offset: int,
                limit: int) -> list[int]:
        ids = sorted(self._ids[modality].tolist(), reverse=descending)
        return ids[offset:offset + limit]

    def keyword(self, modality: str, text: str, where: Any, limit: int) -> Any:
        from retrieval.errors import InvalidQueryError
        raise InvalidQueryError("this in-memory generation has no keyword index")

    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, int]:
        wanted = set(paths)
        return {r.path: r.id for r in self._records.values() if r.path in wanted}

    def close(self) -> None:
        self.closed = True


def colour_records(image_paths: dict[str, Path]) -> list[ItemRecord]:
    """Images 0..n-1 (one per colour, labelled) and two captions each as texts n.. (linked
    by image_id), built by the store's builder as the indexer builds them."""
    images = [NewImage(str(path), {"label": colour}) for colour, path in image_paths.items()]
    texts = [NewText(caption, image=index) for index, colour in enumerate(image_paths)
             for caption in (f"a {colour} square", f"something coloured {colour}")]
    return linked_records(images, texts, start_id=0)


def _encode(clip, records: list[ItemRecord], image_paths: dict[str, Path]) -> dict[str, Any]:
    from retrieval.models.inference import encode_images, encode_texts

    return {"image": encode_images(clip, list(image_paths.values())),
            "text": encode_texts(clip, [r.text for r in records if r.modality == "text"])}


def colour_generation(clip, image_paths: dict[str, Path], name: str = "g1") -> InMemoryGeneration:
    """Images 0..n-1 (one per colour) and two captions each as texts n.. (image_id set)."""
    records = colour_records(image_paths)
    return InMemoryGeneration(name, clip.embed_dim, records, _encode(clip, records, image_paths))


READ, ADMIN = "reader-key", "admin-key"  # the keys the keyed test services are started with
AUTH = {"Authorization": f"Bearer {READ}"}


def keyed_service(tiny: Any, root: Path, **settings: Any) -> ServerThread:
    """A real server over `root` with the read and admin keys above and `settings`."""
    from api.app import create_app
    from api.settings import Settings

    options = {"read_keys": (READ,), "admin_key": ADMIN, **settings}
    return ServerThread(create_app(Settings(index=root, **options), clip=tiny))


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> until `stop()`."""

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


def build_index(root: Path, clip, image_paths: dict[str, Path]) -> Path:
    """A real index generation written through retrieval.store (what `clipdex index build`
    writes): one image per colour with two captions, the captions also as text items."""
    from retrieval.models.identity import model_identity
    from retrieval.store import write_generation

    resolved = {colour: path.resolve() for colour, path in image_paths.items()}
    records = colour_records(resolved)
    write_generation(root, model_identity(clip), records, _encode(clip, records, resolved),
                     media_roots={path.parent for path in resolved.values()})
    return root


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
