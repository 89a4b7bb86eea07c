"""The demo corpus: scikit-image's bundled sample photographs with captions clipdex wrote.

The images install with scikit-image (a dependency), so a fresh clone needs no download and
ships no third-party images; `ensure_demo_corpus` copies them next to data/demo/captions.csv
so the folder is an ordinary manifest that every clipdex command can read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from retrieval.encode import encode_images, encode_texts
from retrieval.manifest import Item, Manifest, read_manifest, read_rows
from retrieval.model import DATA_DIR, ClipModel

DEMO_DIR = DATA_DIR / "demo"


def ensure_demo_corpus(folder: Path | None = None) -> Path:
    """Copy any missing demo images from scikit-image into `folder`; return the manifest path."""
    import skimage

    folder = Path(folder or DEMO_DIR)
    manifest = folder / "captions.csv"
    source = Path(skimage.__file__).parent / "data"
    for name in sorted({row["image"] for row in read_rows(manifest)}):
        if not (folder / name).exists():
            shutil.copyfile(source / name, folder / name)
    return manifest


def demo_corpus(folder: Path | None = None) -> Manifest:
    return read_manifest(ensure_demo_corpus(folder))


def rank_images(clip: ClipModel, corpus: Manifest, query: str, k: int = 5
                ) -> list[tuple[float, Item]]:
    """Brute-force text->image ranking of a small corpus (the index does this at scale)."""
    image_emb = encode_images(clip, [item.image for item in corpus.items])  # (n, d)
    scores = image_emb @ encode_texts(clip, [query])[0]  # (n,)
    order = np.argsort(-scores)[:k]
    return [(float(scores[i]), corpus.items[i]) for i in order]
