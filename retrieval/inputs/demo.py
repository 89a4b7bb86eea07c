"""The demo corpus: scikit-image's bundled sample photographs with captions clipdex wrote.

The images install with scikit-image (a dependency) and the captions ship with clipdex
(retrieval/inputs/demo-captions.csv), so neither a clone nor a wheel downloads anything or
carries third-party images. `demo_corpus()` reads the photographs where scikit-image keeps
them; `ensure_demo_corpus(folder)` lays captions and photographs out in a folder (the
checkout's data/demo, which `make run` indexes) as an ordinary manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from retrieval.inputs.captions import Manifest, read_manifest, read_rows

# The checkout's data/ folder: training figures, and the demo folder `make run` indexes.
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEMO_DIR = DATA_DIR / "demo"
DEMO_CAPTIONS = Path(__file__).resolve().parent / "demo-captions.csv"  # package data


def _photographs() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def ensure_demo_corpus(folder: Path | None = None) -> Path:
    """Copy the captions and any missing demo images into `folder`; return its manifest."""
    folder = Path(folder or DEMO_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "captions.csv"
    if not manifest.exists():
        shutil.copyfile(DEMO_CAPTIONS, manifest)
    for name in sorted({row["image"] for row in read_rows(manifest)}):
        if not (folder / name).exists():
            shutil.copyfile(_photographs() / name, folder / name)
    return manifest


def demo_corpus(folder: Path | None = None) -> Manifest:
    """The demo corpus in `folder` (laid out first), or read in place when none is given."""
    if folder is None:
        return read_manifest(DEMO_CAPTIONS, image_root=_photographs())
    return read_manifest(ensure_demo_corpus(folder))

