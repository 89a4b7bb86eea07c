"""A generation's manifest.json: its format, the model identity it was built with, and a cheap
read that opens neither FAISS nor SQLite (for callers that only need the model, the next id
or the tuning report).

    {"format": "clipdex-index/1", "generation": "000007", "parent": "000006",
     "created": ISO-8601, "clipdex_version": "...",
     "model": {"sha256", "arch", "embed_dim"[, "external": true]}, "embed_dim": d,
     "metric": "inner_product", "normalization": "l2", "next_id": n,
     "modalities": {"image"|"text": {"rows", "live", "deleted", "index": IndexSpec, "tuning"}},
     "files": {file name: SHA-256}, "build": {what wrote it},
     "fields": {name: {"type": "string"|"number"|"boolean"|"datetime", "items": n}},
     "media_roots": [folder, ...],
     "keywords": {"index": "fts5"}}

`fields` are the filterable metadata fields (`retrieval.fields.values`, `store.fields`); a
generation written before they existed has none, and every filter names its field unknown;
`keywords` says the generation has a keyword (FTS5) index (`store.keywords`); `media_roots`
are the folders whose files it may serve (`store.media`).

A generation built from embeddings made elsewhere (`clipdex index build --from-embeddings
--model external:NAME`) records its model as external: `arch` is NAME and `sha256` a hash of
it that no loadable model has. It answers vector and item queries; text and image queries
need that model, and `check_model` says so (ExternalModelError).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrieval.ann import engines as ann
from retrieval.digest import sha256_file
from retrieval.errors import ExternalModelError, IndexCorruptError, IndexMismatchError
from retrieval.fields.values import TYPES
from retrieval.models.choices import MODALITIES
from retrieval.models.identity import ModelIdentity, external_note
from retrieval.store import layout


@dataclass(frozen=True)
class GenerationManifest:
    """One generation's manifest as written (`data` is the JSON object itself)."""

    name: str  # the generation folder's name
    data: dict[str, Any]

    @property
    def parent(self) -> str | None:
        return self.data.get("parent")

    @property
    def model(self) -> ModelIdentity:
        return _identity(self.data["model"])

    @property
    def embed_dim(self) -> int:
        return int(self.data["embed_dim"])

    @property
    def next_id(self) -> int:
        return int(self.data["next_id"])

    def section(self, modality: str) -> dict[str, Any]:
        """rows, live, deleted, index (kind and params) and tuning of one modality."""
        return self.data["modalities"][modality]

    def fields(self) -> dict[str, str]:
        """The filterable metadata fields and their types ({} for an older generation)."""
        return {name: str(field["type"]) for name, field in self.data.get("fields", {}).items()}

    @property
    def has_keywords(self) -> bool:
        """Whether the generation has a keyword index (older ones have none)."""
        return "keywords" in self.data

    def tuning(self) -> dict[str, dict[str, Any]]:
        """The search-parameter tuning report of each modality."""
        return {modality: section["tuning"] for modality, section in
                self.data["modalities"].items()}


def _identity(built: dict[str, Any]) -> ModelIdentity:
    return ModelIdentity(str(built["sha256"]), str(built["arch"]), int(built["embed_dim"]),
                         bool(built.get("external", False)))


def external_model(manifest: dict[str, Any]) -> ModelIdentity | None:
    """The external model a generation's embeddings came from (a manifest.json object), or
    None when clipdex encoded them."""
    built = manifest.get("model")
    return _identity(built) if isinstance(built, dict) and built.get("external") else None


def read_generation_manifest(root: Path, name: str | None = None) -> GenerationManifest:
    """The CURRENT (or the named) generation's manifest, format checked; loads no index."""
    name = name or layout.current_name(root)
    return GenerationManifest(name, load(layout.generation_dir(root, name)))


def load(folder: Path) -> dict[str, Any]:
    """The manifest.json of a generation folder, refused when missing, damaged or of
    another format."""
    path = layout.manifest_file(folder)
    if not path.is_file():
        raise IndexCorruptError(f"{path} is missing; the generation is incomplete")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError from a damaged byte
        raise IndexCorruptError(f"{path}: not valid JSON ({error})") from None
    if manifest.get("format") != layout.FORMAT:
        raise IndexCorruptError(f"{path}: format {manifest.get('format')!r}, "
                                f"expected {layout.FORMAT}")
    if "checksum" in manifest and manifest["checksum"] != _checksum(manifest):
        raise IndexCorruptError(f"{path}: its content does not match its checksum; the "
                                "manifest was changed")
    problem = _shape_problem(manifest)
    if problem:
        raise IndexCorruptError(f"{path}: damaged ({problem}); the manifest was changed")
    return manifest


def sealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with a checksum of its own content, so a changed value anywhere in it
    (a tuning figure, a field type) is caught at load like a changed file."""
    return {**manifest, "checksum": _checksum(manifest)}


def _checksum(manifest: dict[str, Any]) -> str:
    content = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _shape_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the parts of a manifest that readers act on (manifests written
    before they were sealed with a checksum are only checked this way)."""
    try:
        for modality in MODALITIES:
            section = manifest["modalities"][modality]
            spec = ann.IndexSpec(**section["index"])
            counts = [section[key] for key in ("rows", "live", "deleted")]
            if spec.kind not in ann.KINDS or not all(isinstance(n, int) for n in counts):
                return f"modality {modality}: index kind {spec.kind!r}, counts {counts}"
        for name, field in manifest.get("fields", {}).items():
            if field["type"] not in TYPES or not isinstance(field["items"], int):
                return f"field {name!r}: {field}"
    except (KeyError, TypeError, AttributeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def check_model(manifest: dict[str, Any], model_sha256: str | None,
                embed_dim: int | None) -> None:
    """IndexMismatchError unless the generation was built with this model and dimension."""
    built = manifest["model"]
    if model_sha256 is not None and model_sha256 != built["sha256"]:
        if built.get("external"):
            raise ExternalModelError(external_note(_identity(built)))
        raise IndexMismatchError(mismatch_note(built["sha256"], model_sha256, built["arch"]))
    if embed_dim is not None and int(embed_dim) != int(manifest["embed_dim"]):
        raise IndexMismatchError(f"index has embed_dim {manifest['embed_dim']}, "
                                 f"the model gives {embed_dim}")


def mismatch_note(built_sha256: str, loaded_sha256: str, arch: str | None = None) -> str:
    """Why an index refuses a model's queries, and what to do about it."""
    built = f"{built_sha256[:16]}…" + (f" ({arch})" if arch else "")
    return (f"index was built with model sha256 {built}, you loaded {loaded_sha256[:16]}…; "
            "rebuild the index or load the same model")


HASH_ON_OPEN_BYTES = 256 * 2**20  # larger files are hashed when written and by `verify`


def check_files(folder: Path, manifest: dict[str, Any], full: bool = False) -> None:
    """IndexCorruptError naming the first file that is missing, has the wrong size or fails
    its SHA-256.

    Every file's size is checked; its SHA-256 too when `full` or when it is at most
    HASH_ON_OPEN_BYTES, so opening a generation with 10 GB of lists or vectors does not
    read 10 GB. Hashes were taken when the files were written; `clipdex index verify`
    re-reads them all. (Manifests from before sizes were recorded are hashed in full.)"""
    sizes = manifest.get("sizes") or {}
    for filename, expected in manifest["files"].items():
        path = Path(folder) / filename
        if not path.is_file():
            raise IndexCorruptError(f"{path} is missing")
        size = path.stat().st_size
        if filename in sizes and size != int(sizes[filename]):
            raise IndexCorruptError(f"{path} has {size:,} bytes, the manifest says "
                                    f"{int(sizes[filename]):,}; the file was changed")
        if not full and filename in sizes and size > HASH_ON_OPEN_BYTES:
            continue
        actual = sha256_file(path)
        if actual != expected:
            raise IndexCorruptError(f"{path}: SHA-256 {actual[:12]}… differs from the "
                                    f"manifest's {expected[:12]}…; the file was changed")


def new(model: ModelIdentity, sections: dict[str, Any], next_id: int, name: str,
        parent: str | None, build_info: dict[str, Any], files: dict[str, str],
        sizes: dict[str, int], fields: dict[str, dict[str, Any]] | None = None,
        keywords: dict[str, Any] | None = None,
        media_roots: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest of a generation being committed (`files`: name -> SHA-256, `sizes`:
    name -> bytes, `fields`: the filterable metadata fields and their types, `keywords`:
    the keyword index, `media_roots`: the folders whose files it may serve)."""
    return {
        "format": layout.FORMAT, "generation": name, "parent": parent,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "clipdex_version": _version(),
        "model": {"sha256": model.sha256, "arch": model.arch, "embed_dim": model.embed_dim,
                  **({"external": True} if model.external else {})},
        "embed_dim": model.embed_dim, "metric": "inner_product", "normalization": "l2",
        "next_id": next_id, "modalities": sections, "files": files, "sizes": sizes,
        "build": build_info, "fields": fields or {}, "media_roots": list(media_roots),
        **({"keywords": keywords} if keywords is not None else {}),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipdex")
    except PackageNotFoundError:
        return "unknown"
