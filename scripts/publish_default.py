"""Publish a training run's best checkpoint as the bundled default model in data/.

    .venv/bin/python scripts/publish_default.py weights RUN_DIR
    .venv/bin/clipdex eval ... --model default --json test.json
    .venv/bin/python scripts/publish_default.py evaluation test.json "the eval command"

`weights` stores the trained tensors in float16 (half the bytes; the loader casts them back
to float32) with the run's model card; `evaluation` adds the test-split figures measured on
exactly those published weights, so `clipdex eval --model default` reproduces them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from retrieval.card import card_path, read_weights, write_checkpoint, write_json_atomic
from retrieval.model import DATA_DIR, DEFAULT_CHECKPOINT


def publish_weights(run: Path) -> None:
    card = json.loads(card_path(run / "best.safetensors").read_text())
    state = {name: tensor.to(torch.float16) if tensor.is_floating_point() else tensor
             for name, tensor in read_weights(run / "best.safetensors").items()}
    for field in ("format", "sha256", "weights_file", "num_tensors"):
        card.pop(field, None)
    card["storage_dtype"] = "float16"
    write_checkpoint(DEFAULT_CHECKPOINT, state, card)
    shutil.copyfile(run / "training.png", DATA_DIR / "clipdex-default-training.png")
    shutil.copyfile(run / "log.csv", DATA_DIR / "clipdex-default-training.csv")


def add_evaluation(results: Path, command: str) -> None:
    path = card_path(DEFAULT_CHECKPOINT)
    card = json.loads(path.read_text())
    card["evaluation"]["flickr8k_test_1k"] = {**json.loads(results.read_text()),
                                              "command": command}
    write_json_atomic(path, card)


if __name__ == "__main__":
    if sys.argv[1] == "weights":
        publish_weights(Path(sys.argv[2]))
    else:
        add_evaluation(Path(sys.argv[2]), sys.argv[3])
