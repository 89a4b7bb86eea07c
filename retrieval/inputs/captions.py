"""Caption manifests (CSV, JSONL, parquet): image paths with zero or more captions each.

Rows naming the same image are merged, so both "one row per caption" (Flickr8k, COCO) and
"one row per image with a list of captions" work. Missing images are reported, not fatal.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import ManifestError

IMAGE_COLUMNS = ("image", "image_path", "filepath", "path", "file", "filename")
CAPTION_COLUMNS = ("caption", "captions", "text", "texts")
LABEL_COLUMNS = ("label", "class")
CSV_SUFFIXES = (".csv", ".tsv")
# A CSV cell that reads as a number: no leading zero (so "007" and "02134" stay strings).
_NUMERAL = re.compile(r"[+-]?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")


@dataclass
class Item:
    image: Path
    captions: list[str] = field(default_factory=list)
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skipped:
    """One input that was skipped, with the reason; written to error reports as JSONL."""

    path: str
    reason: str

    def as_json(self) -> str:
        return json.dumps({"path": self.path, "reason": self.reason})


@dataclass
class Manifest:
    source: Path
    items: list[Item]
    problems: list[Skipped]

    @property
    def num_captions(self) -> int:
        return sum(len(item.captions) for item in self.items)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV, JSONL or parquet file as dicts; the error names the file and line."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several unrelated types
            raise ManifestError(f"{path}: unreadable parquet file ({error})") from error
    raise ManifestError(f"{path}: unknown manifest type {suffix!r}; use .csv, .jsonl or .parquet")


def cell_value(text: Any) -> Any:
    """A CSV cell as the value JSON would have carried: "" is no value (None), true/false a
    boolean, a numeral a number, anything else the text (dates stay text: their field is
    typed date-time when every value parses, see `retrieval.fields.values`)."""
    if not isinstance(text, str):
        return text
    lowered = text.strip().lower()
    if not lowered:
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if _NUMERAL.fullmatch(lowered):
        return float(lowered) if "." in lowered or "e" in lowered else int(lowered)
    return text


def typed_metadata(path: Path, row: dict[str, Any]) -> dict[str, Any]:
    """A manifest row's extra columns as metadata: CSV cells typed by `cell_value`, JSONL
    and parquet values as they are."""
    if Path(path).suffix.lower() in CSV_SUFFIXES:
        return {key: cell_value(value) for key, value in row.items()}
    return dict(row)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ManifestError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{number}: each line must be a JSON object")
            rows.append(row)
    return rows


def pick_column(columns: Iterable[str], wanted: str | None, candidates: tuple[str, ...],
                source: Path, role: str) -> str | None:
    columns = list(columns)
    if wanted:
        if wanted not in columns:
            raise ManifestError(f"{source}: no column {wanted!r} for {role}; columns: {columns}")
        return wanted
    return next((name for name in candidates if name in columns), None)


def read_manifest(path: Path, image_root: Path | None = None, split: set[str] | None = None,
                  image_column: str | None = None, caption_column: str | None = None,
                  label_column: str | None = None) -> Manifest:
    """Read a manifest; relative image paths resolve against `image_root` (default: its folder).

    `split`, when given, keeps only rows whose image value is in it (e.g. Flickr8k's test.txt).
    """
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows")
    columns = rows[0].keys()
    image_key = pick_column(columns, image_column, IMAGE_COLUMNS, path, "image paths")
    if image_key is None:
        raise ManifestError(f"{path}: no image column; name one of {IMAGE_COLUMNS} "
                            f"or pass --image-column (columns: {list(columns)})")
    caption_key = pick_column(columns, caption_column, CAPTION_COLUMNS, path, "captions")
    label_key = pick_column(columns, label_column, LABEL_COLUMNS, path, "labels")
    root = Path(image_root) if image_root else path.parent
    items: dict[str, Item] = {}
    for row in rows:
        name = row.get(image_key)
        if not name:
            continue
        name = str(name)
        if split is not None and name not in split and Path(name).name not in split:
            continue
        item = items.get(name)
        if item is None:
            extra = typed_metadata(path, {k: v for k, v in row.items()
                                          if k not in (image_key, caption_key, label_key)})
            label = row.get(label_key) if label_key else None
            item = items[name] = Item(image=root / name, label=None if label is None else str(label),
                                      metadata=extra)
        item.captions.extend(_captions(row.get(caption_key) if caption_key else None))
    kept, problems = [], []
    for item in items.values():
        if item.image.is_file():
            kept.append(item)
        else:
            problems.append(Skipped(str(item.image), "image file not found"))
    return Manifest(source=path, items=kept, problems=problems)


def _captions(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(text).strip() for text in value if str(text).strip()]
    text = str(value).strip()
    return [text] if text else []


def read_split(path: Path) -> set[str]:
    """A split file: one image name per line (the Flickr8k convention)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"split file {path} does not exist")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}
