"""Average the trained tensors of several epochs of one run (weight averaging, a "soup").

    .venv/bin/python scripts/average_checkpoints.py RUN_DIR OUT_DIR 7 8 9 10

Writes OUT_DIR/best.safetensors (with the last named epoch's model card, marked as an
average) and copies the run's log.csv and training.png, so OUT_DIR can be evaluated with
`clipdex eval --model OUT_DIR/best.safetensors` and published like a run.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from retrieval.models.card import card_path, read_weights, write_checkpoint


def average(run: Path, out: Path, epochs: list[int]) -> dict:
    paths = [run / f"epoch_{epoch:03d}.safetensors" for epoch in epochs]
    states = [read_weights(path) for path in paths]
    mean = {key: torch.stack([state[key].float() for state in states]).mean(dim=0)
            .to(tensor.dtype) if tensor.is_floating_point() else tensor
            for key, tensor in states[-1].items()}
    card = json.loads(card_path(paths[-1]).read_text())
    for field in ("format", "sha256", "weights_file", "num_tensors"):
        card.pop(field, None)
    card["training"]["averaged_epochs"] = epochs
    card["evaluation"] = {}  # the validation figures were those of one epoch, not the mean
    out.mkdir(parents=True, exist_ok=True)
    for name in ("log.csv", "training.png"):
        shutil.copyfile(run / name, out / name)
    return write_checkpoint(out / "best.safetensors", mean, card)


if __name__ == "__main__":
    average(Path(sys.argv[1]), Path(sys.argv[2]), [int(e) for e in sys.argv[3:]])
