"""Fixtures of the service tests: the colour photographs and a real index of them (once per
test module, so each module's server starts from a pristine index)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.api.helpers import AUTH, build_index
from tests.conftest import COLOURS, make_image


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    return {name: make_image(folder / f"{name}.png", rgb) for name, rgb in COLOURS.items()}


@pytest.fixture(scope="module")
def index_root(tiny, images, tmp_path_factory) -> Path:
    return build_index(tmp_path_factory.mktemp("index"), tiny, images)


@pytest.fixture
def client(server):
    """An HTTP client with the read key, on the module's `server` fixture."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        yield http
