"""Shared fixtures: real models (a tiny random CLIP and the bundled towers) and real images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FLICKR8K = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k"


@pytest.fixture(scope="session")
def tiny():
    """A randomly initialised tiny open_clip CLIP (native towers): loads in well under a second."""
    from retrieval.models.loading import load_model

    return load_model("clipdex-tiny", device="cpu")


@pytest.fixture(scope="session")
def towers():
    """The real EfficientNet-Lite0 + MiniLM dual encoder with untrained projections."""
    from retrieval.models.loading import load_model

    return load_model("clipdex-effnet-minilm", device="cpu")


def make_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> Path:
    """A small photo-like image: a colour with a gradient and noise, saved by extension."""
    rng = np.random.default_rng(sum(colour))
    base = np.array(colour, dtype=np.float32)[None, None, :]
    ramp = np.linspace(0, 60, size[0], dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 8, (size[1], size[0], 3)).astype(np.float32)
    pixels = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200),
           "yellow": (220, 210, 40), "purple": (130, 40, 150), "black": (10, 10, 10),
           "white": (240, 240, 240), "orange": (240, 140, 20)}


@pytest.fixture
def colour_corpus(tmp_path: Path) -> Path:
    """A CSV manifest of 8 coloured images with two captions each and a label."""
    rows = ["image,caption,label"]
    for name, colour in COLOURS.items():
        make_image(tmp_path / "img" / f"{name}.png", colour)
        rows.append(f"img/{name}.png,a {name} square,{name}")
        rows.append(f"img/{name}.png,something coloured {name},{name}")
    manifest = tmp_path / "captions.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest
