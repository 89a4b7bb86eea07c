"""Checkpoints on disk: safetensors weights plus a JSON model card beside them.

`x.safetensors` holds the weights clipdex trained (all of them, or only those that differ
from pip-installed towers); `x.card.json` says how to rebuild the rest, how the model was
made, how well it did, and the SHA-256 of the weights file so a swapped file is caught.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from retrieval.atomic import replacing, write_json_atomic
from retrieval.digest import sha256_file
from retrieval.errors import ModelLoadError

CARD_FORMAT = "clipdex-model-card/1"
REQUIRED_FIELDS = ("format", "arch", "init", "weights", "embed_dim", "sha256")


def card_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".card.json")


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], card: dict[str, Any]) -> dict:
    """Write weights then card, each atomically (temp file + rename), and return the card."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    with replacing(path) as temp:
        save_file(tensors, str(temp))
    card = {"format": CARD_FORMAT, **card, "sha256": sha256_file(path),
            "weights_file": path.name, "num_tensors": len(tensors)}
    write_json_atomic(card_path(path), card)
    return card




def read_card(weights_path: Path) -> dict[str, Any]:
    path = card_path(weights_path)
    if not Path(weights_path).exists():
        raise ModelLoadError(f"checkpoint {weights_path} does not exist")
    if not path.exists():
        raise ModelLoadError(
            f"{weights_path} has no model card {path.name} beside it; clipdex needs the card "
            "to know the architecture (for an open_clip checkpoint use the ARCH:TAG form)"
        )
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from error
    missing = [name for name in REQUIRED_FIELDS if name not in card]
    if missing:
        raise ModelLoadError(f"{path}: model card lacks {', '.join(missing)}")
    actual = sha256_file(Path(weights_path))
    if actual != card["sha256"]:
        raise ModelLoadError(
            f"{weights_path}: SHA-256 {actual[:12]}… differs from the card's {card['sha256'][:12]}…;"
            " the weights file was changed or truncated"
        )
    return card


def read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own SafetensorError
        raise ModelLoadError(f"{weights_path}: unreadable safetensors file ({error})") from error
