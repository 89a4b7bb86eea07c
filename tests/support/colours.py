"""The colour-square corpus (tests.conftest.COLOURS) as the store's records, as an exact
in-memory generation and as a real index written through retrieval.store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval.store import ItemRecord, NewImage, NewText, linked_records
from tests.support.oracles import InMemoryGeneration


def colour_records(image_paths: dict[str, Path]) -> list[ItemRecord]:
    """Images 0..n-1 (one per colour, labelled) and two captions each as texts n.. (linked
    by image_id), built by the store's builder as the indexer builds them."""
    images = [NewImage(str(path), {"label": colour}) for colour, path in image_paths.items()]
    texts = [NewText(caption, image=index) for index, colour in enumerate(image_paths)
             for caption in (f"a {colour} square", f"something coloured {colour}")]
    return linked_records(images, texts, start_id=0)


def encode_records(clip, records: list[ItemRecord], image_paths: dict[str, Path]
                   ) -> dict[str, Any]:
    from retrieval.models.inference import encode_images, encode_texts

    return {"image": encode_images(clip, list(image_paths.values())),
            "text": encode_texts(clip, [r.text for r in records if r.modality == "text"])}


def colour_generation(clip, image_paths: dict[str, Path], name: str = "g1") -> InMemoryGeneration:
    """The records of `colour_records`, encoded by `clip`, in an exact in-memory generation."""
    records = colour_records(image_paths)
    return InMemoryGeneration(name, clip.embed_dim, records,
                              encode_records(clip, records, image_paths))


def build_index(root: Path, clip, image_paths: dict[str, Path]) -> Path:
    """A real index generation written through retrieval.store (what `clipdex index build`
    writes): one image per colour with two captions, the captions also as text items."""
    from retrieval.models.identity import model_identity
    from retrieval.store import write_generation

    resolved = {colour: path.resolve() for colour, path in image_paths.items()}
    records = colour_records(resolved)
    write_generation(root, model_identity(clip), records, encode_records(clip, records, resolved),
                     media_roots={path.parent for path in resolved.values()})
    return root
