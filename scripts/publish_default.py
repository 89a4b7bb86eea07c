"""Publish a training run's best checkpoint as a bundled model in data/ (default or fast).

    .venv/bin/python scripts/publish_default.py weights RUN_DIR [NAME]
    .venv/bin/clipdex eval ... --model NAME --json test.json
    .venv/bin/python scripts/publish_default.py evaluation test.json "the eval command" [NAME]
    .venv/bin/python scripts/publish_default.py generality checks.json [NAME]

NAME is "default" (the model `--model default` loads) or "fast"; it defaults to "default".
`weights` stores the trained tensors in float16 (half the bytes; the loader casts them back
to float32) with the run's model card, log and plot; `evaluation` adds the test-split figures
measured on exactly those published weights, so `clipdex eval --model NAME` reproduces them;
`generality` adds the output of scripts/generality.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from retrieval.atomic import write_json_atomic
from retrieval.inputs.demo import DATA_DIR
from retrieval.models.card import card_path, read_weights, write_checkpoint
from retrieval.models.loading import BUNDLED


def publish_weights(run: Path, name: str) -> None:
    target = BUNDLED[name]
    card = json.loads(card_path(run / "best.safetensors").read_text())
    state = {key: tensor.to(torch.float16) if tensor.is_floating_point() else tensor
             for key, tensor in read_weights(run / "best.safetensors").items()}
    for field in ("format", "sha256", "weights_file", "num_tensors"):
        card.pop(field, None)
    card["storage_dtype"] = "float16"
    card["bundled_as"] = name
    write_checkpoint(target, state, card)
    shutil.copyfile(run / "training.png", DATA_DIR / f"clipdex-{name}-training.png")
    shutil.copyfile(run / "log.csv", DATA_DIR / f"clipdex-{name}-training.csv")


def add_to_card(name: str, section: str, key: str, payload: dict) -> None:
    path = card_path(BUNDLED[name])
    card = json.loads(path.read_text())
    card.setdefault(section, {})[key] = payload
    write_json_atomic(path, card)


if __name__ == "__main__":
    action, args = sys.argv[1], sys.argv[2:]
    if action == "weights":
        publish_weights(Path(args[0]), args[1] if len(args) > 1 else "default")
    elif action == "evaluation":
        add_to_card(args[2] if len(args) > 2 else "default", "evaluation", "flickr8k_test_1k",
                    {**json.loads(Path(args[0]).read_text()), "command": args[1]})
    else:
        add_to_card(args[1] if len(args) > 1 else "default", "evaluation", "generality",
                    json.loads(Path(args[0]).read_text()))
