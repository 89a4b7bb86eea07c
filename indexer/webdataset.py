"""Webdataset tar shards (what img2dataset writes), read as samples without extracting them.

A shard is a tar whose members come in groups sharing a key, the member's name up to the
first dot of its base name (webdataset's rule): `000010001.jpg` with `000010001.txt` (the
caption) and `000010001.json` (img2dataset's record: caption, url, key, status, width, ...).
An image member is not read here: its byte range is recorded (`TarMember`) and the decoder
reads it later, in whichever process or machine decodes it. Caption and JSON members are
small and read now.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from retrieval.inputs.captions import Skipped
from retrieval.models.files import TarMember

TAR_EXTENSIONS = (".tar",)
SAMPLE_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
MAX_SIDECAR_BYTES = 1 << 20  # a caption or JSON record larger than this is not one


@dataclass
class Sample:
    """One key's members: the image's location, and its caption and JSON members' text."""

    key: str
    image: TarMember | None = None
    text: str | None = None
    json: str | None = None


def read_shard(archive: Path, problems: list[Skipped]) -> list[Sample]:
    """The samples of one tar shard in archive order; a damaged archive gives the samples
    before the damage and a Skipped naming it, never an exception."""
    archive = Path(archive).resolve()
    samples: dict[str, Sample] = {}
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    _add_member(tar, info, archive, samples, problems)
    except (tarfile.TarError, OSError) as error:
        problems.append(Skipped(str(archive), f"unreadable tar archive ({error})"))
    for sample in samples.values():
        if sample.image is None:
            problems.append(Skipped(str(archive / sample.key),
                                    "webdataset sample without an image member"))
    return [sample for sample in samples.values() if sample.image is not None]


def split_key(name: str) -> tuple[str, str]:
    """("dir/000001", "jpg") for "dir/000001.jpg": the key ends at the base name's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _add_member(tar: tarfile.TarFile, info: tarfile.TarInfo, archive: Path,
                samples: dict[str, Sample], problems: list[Skipped]) -> None:
    key, extension = split_key(info.name)
    extension = extension.rpartition(".")[2]  # "c.png" -> "png": a field is typed by its end
    sample = samples.setdefault(key, Sample(key))
    if extension in SAMPLE_IMAGE_EXTENSIONS:
        sample.image = TarMember(archive, info.name, info.offset_data, info.size)
    elif extension in ("txt", "json"):
        if info.size > MAX_SIDECAR_BYTES:
            problems.append(Skipped(str(archive / info.name), f"{info.size:,}-byte {extension} "
                                    f"member, over the {MAX_SIDECAR_BYTES:,}-byte cap"))
            return
        handle = tar.extractfile(info)
        text = handle.read().decode("utf-8", errors="replace") if handle else ""
        if extension == "txt":
            sample.text = text
        else:
            sample.json = text
