"""An index and the model it needs, as one object: what a script, the command line and the
service each open.

    from retrieval import Query, load_model, open_index

    with open_index("pictures.idx", load_model("default")) as index:
        for hit in index.search(Query.text("a dog on the beach", k=5)).hits:
            print(hit.score, hit.item.path)
        index.add_texts(["a red kite over the dunes"])

An index records the fingerprint of the model that built it, and `open_index` holds it to
that: another model's vectors would answer nonsense, so opening with one fails
(IndexMismatchError). Without a model it loads the bundled model that built the index, when
one did. An index of embeddings made outside clipdex (`index build --from-embeddings`) has no
model clipdex can load: it opens with an `UnavailableEncoder`, answers vector and item
queries, and every text or image says why it cannot (ExternalModelError).

Adding an item has one owner here: sniff the upload, name it by its content, answer a
duplicate with the item that holds it, encode, keep the file, write the records, commit. A
write makes a new generation under the store's writer lock (safe beside an `index add`), and
this object then serves it. The service runs these same calls on its request threads, on an
Index that many requests share: that one does not follow its writes (`follow_writes=False`);
the service opens the new generation and swaps it in between requests instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing_extensions import Self

from retrieval.errors import (
    DuplicateItemError,
    ExternalModelError,
    IndexStoreError,
    ModelLoadError,
)
from retrieval.fields.values import check_metadata
from retrieval.inputs.images import DecodeLimits, image_format
from retrieval.models.clip import ClipModel
from retrieval.models.identity import ModelIdentity, external_note
from retrieval.search.query import Listing, Query
from retrieval.search.query_encoders import (
    ImageLike,
    ModelEncoder,
    QueryEncoder,
    UnavailableEncoder,
)
from retrieval.search.searcher import MAX_DEPTH, GenerationLike, Result, Searcher
from retrieval.store import (
    StoreOptions,
    append_items,
    image_with_captions,
    keep_upload,
    open_generation,
    read_current,
    read_generation_manifest,
    text_records,
    update_generation,
    upload_path,
)
from retrieval.store.manifest import external_model
from retrieval.store.readers import QUERY_SECONDS
from retrieval.store.write import DEFAULT_OPTIONS

# the file suffix an upload is kept under, by the format its bytes are sniffed as
UPLOAD_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
                 "HEIF": ".heic", "AVIF": ".avif"}


@dataclass(frozen=True)
class Added:
    """The items a write made (or, for a duplicate, the one that already holds the bytes) and
    the generation that holds them."""

    ids: list[int]
    generation: str
    duplicate: bool = False


class Index:
    """One generation of an index directory with the encoder its queries need. Reads are safe
    from many threads; writes make a new generation and `Index` then serves it."""

    def __init__(self, root: Path | None, generation: GenerationLike,
                 encoder: QueryEncoder | None, max_depth: int = MAX_DEPTH,
                 query_seconds: float = QUERY_SECONDS, follow_writes: bool = True):
        self.root = None if root is None else Path(root)
        self.query_seconds, self.follow_writes = query_seconds, follow_writes
        self.searcher = Searcher(generation, encoder_for(generation, encoder), max_depth)

    # --- what it is ---
    @property
    def generation(self) -> GenerationLike:
        return self.searcher.generation

    @property
    def name(self) -> str:
        return self.searcher.generation.name

    @property
    def embed_dim(self) -> int:
        return self.searcher.embed_dim

    @property
    def encoder(self) -> QueryEncoder | None:
        return self.searcher.encoder

    @property
    def external(self) -> ModelIdentity | None:
        """The outside model its embeddings came from, None when clipdex made them."""
        return external_of(self.generation)

    def info(self) -> dict[str, Any]:
        """The generation, its counts and the queries it answers (an index of external
        embeddings answers vectors and item ids only, and says why)."""
        generation = self.generation
        counts = {"generation": generation.name, "images": generation.count("image"),
                  "texts": generation.count("text")}
        external = self.external
        if external is not None:
            return {"model": external.arch, "embed_dim": external.embed_dim,
                    "external_model": True, "queries": ["vector", "item"],
                    "note": external_note(external), **counts}
        return {"model": generation.info.model.arch, "embed_dim": generation.embed_dim,
                **counts}

    # --- reads ---
    def search(self, query: Query) -> Result:
        return self.searcher.search(query)

    def browse(self, listing: Listing) -> Result:
        return self.searcher.browse(listing)

    def item(self, item_id: int) -> Any:
        return self.searcher.item(item_id)

    def image_file(self, item_id: int) -> tuple[Path, str]:
        return self.searcher.image_file(item_id)

    def caption(self, image: ImageLike, k: int = 5, where: Any = None) -> Any:
        return self.searcher.caption(image, k, where)

    def classify(self, image: ImageLike, labels: Sequence[str]) -> Any:
        return self.searcher.classify(image, labels)

    # --- writes ---
    def write_model(self) -> ModelIdentity:
        """The model new items are stored under: the one that built the index. An index of
        external embeddings takes no new texts or images (nothing here can encode them)."""
        external = self.external
        if external is not None:
            raise ExternalModelError(external_note(external))
        return self.generation.info.model

    def add_texts(self, texts: Sequence[str], image_id: int | None = None,
                  metadata: dict[str, Any] | None = None) -> Added:
        """Caption texts (of item `image_id` when given) or free texts with `metadata`."""
        model = self.write_model()
        records = text_records(list(texts), image_id=image_id, metadata=metadata)
        vectors = self._encoder().texts(list(texts))
        return self._append(model, records, {"text": vectors})

    def add_image(self, data: bytes, captions: Sequence[str] = (),
                  metadata: dict[str, Any] | None = None,
                  limits: DecodeLimits | None = None) -> Added:
        """Keep an image's bytes under the index root, named by their content, with optional
        captions. The same bytes again answer the existing item (`duplicate`), unless
        captions come with them: those belong to `add_texts(..., image_id=)`, and
        DuplicateItemError says so rather than dropping them."""
        model, root = self.write_model(), self._root()
        captions = [caption.strip() for caption in captions if caption.strip()]
        check_metadata(metadata or {})  # before the bytes are sniffed, encoded or kept
        stored = upload_path(data, UPLOAD_SUFFIX[image_format(data, limits or DecodeLimits())])
        existing = self.generation.ids_for_paths([stored]).get(stored)
        if existing is not None:
            return self._duplicate(existing, captions, self.name)
        encoder = self._encoder()
        vectors = {"image": encoder.images([data])}  # (1, d)
        if captions:
            vectors["text"] = encoder.texts(captions)
        keep_upload(root, stored, data)
        records = image_with_captions(stored, captions, metadata)
        try:  # the check above is a shortcut; the store's, under its lock, is the one that holds
            return self._append(model, records, vectors, unique_paths=True)
        except DuplicateItemError as duplicate:
            return self._duplicate(duplicate.item_id, captions, self._after_write())

    def delete(self, ids: Sequence[int] = (), paths: Sequence[str | Path] = (),
               options: StoreOptions = DEFAULT_OPTIONS) -> str:
        """Tombstone items by id or image path (an image takes its captions along) into a new
        generation (`delete_items`), then serve it. An index of external embeddings is
        served read-only: its writes belong to the tool that made its embeddings."""
        self.write_model()
        delete_items(self._root(), ids, paths, options)
        return self._after_write()

    def reopen(self) -> str:
        """Serve the root's current generation (after a write here or elsewhere); its name."""
        encoder = self.searcher.encoder
        generation = open_generation(self._root(), embed_dim=self.generation.embed_dim,
                                     model_sha256=encoder.model_sha256 if encoder else None,
                                     query_seconds=self.query_seconds)
        old, self.searcher = self.searcher, Searcher(generation, self.searcher.encoder,
                                                     self.searcher.max_depth)
        old.generation.close()
        return generation.name

    def close(self) -> None:
        self.generation.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers ---
    def _after_write(self) -> str:
        """The generation the root now points at, served here when this Index follows it."""
        return self.reopen() if self.follow_writes else read_current(self._root())

    def _root(self) -> Path:
        if self.root is None:
            raise IndexStoreError("this index was opened without its directory; it cannot "
                                  "write")
        return self.root

    def _encoder(self) -> QueryEncoder:
        if self.encoder is None:
            raise ModelLoadError("no model is loaded: open the index with one to add items")
        return self.encoder

    def _append(self, model: ModelIdentity, records: list, vectors: dict,
                unique_paths: bool = False) -> Added:
        appended = append_items(self._root(), model, records, vectors, unique_paths=unique_paths)
        return Added(appended.ids, self._after_write())

    @staticmethod
    def _duplicate(existing: int, captions: list[str], generation: str) -> Added:
        if captions:
            raise DuplicateItemError(f"this image is already item {existing}; add its captions "
                                     f"as texts with image_id {existing}", existing)
        return Added([existing], generation, duplicate=True)


def external_of(generation: GenerationLike) -> ModelIdentity | None:
    """The external model of a generation's embeddings, None when clipdex made them."""
    return external_model(getattr(generation, "manifest", None) or {})  # fakes may have none


def encoder_for(generation: GenerationLike, encoder: QueryEncoder | None) -> QueryEncoder | None:
    """An index of external embeddings gets an encoder that says why it cannot encode."""
    external = external_of(generation)
    if external is not None:
        return UnavailableEncoder(generation.embed_dim, external_note(external))
    return encoder


def delete_items(root: Path, ids: Sequence[int] = (), paths: Sequence[str | Path] = (),
                 options: StoreOptions = DEFAULT_OPTIONS) -> str:
    """Tombstone items by id or image path into a new generation; its name. Deleting needs
    no model (`clipdex index delete` opens nothing); the store resolves the paths under its
    writer lock."""
    model = read_generation_manifest(Path(root)).model
    return update_generation(Path(root), model, delete_ids=ids,
                             delete_paths=[str(Path(path).resolve()) for path in paths],
                             options=options, build_info={"action": "delete"})


ModelSource = ClipModel | QueryEncoder | Callable[[], ClipModel] | None


def open_index(root: str | Path, model: ModelSource = None, *,
               query_seconds: float = QUERY_SECONDS, max_depth: int = MAX_DEPTH,
               follow_writes: bool = True) -> Index:
    """The current generation under `root`, with the encoder its queries need: `model` is a
    loaded ClipModel, an encoder (the service's batched one), or a function that loads one,
    called only when the index needs a model; None loads the bundled model that built it. An
    index of external embeddings opens without one, whatever `model` is."""
    root = Path(root)
    built = read_generation_manifest(root)
    if built.model.external:
        generation = open_generation(root, name=built.name, query_seconds=query_seconds)
        return Index(root, generation, None, max_depth, query_seconds, follow_writes)
    if model is None:
        from retrieval.models.loading import bundled_spec_for, load_model

        model = load_model(bundled_spec_for(built.model))
    elif callable(model):
        model = model()
    encoder = ModelEncoder(model) if isinstance(model, ClipModel) else model
    generation = open_generation(root, model_sha256=encoder.model_sha256,
                                 embed_dim=encoder.embed_dim, name=built.name,
                                 query_seconds=query_seconds)
    return Index(root, generation, encoder, max_depth, query_seconds, follow_writes)
