"""scripts/average_checkpoints.py: the mean of a run's epoch checkpoints, loadable as one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from retrieval.models.card import read_weights, write_checkpoint
from retrieval.models.loading import describe, load_model

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "average_checkpoints.py"


def _script():
    spec = importlib.util.spec_from_file_location("average_checkpoints", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_average_of_two_epochs_is_their_mean_and_loads(tiny, tmp_path):
    run = tmp_path / "run"
    base = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    card = {**describe(tiny), "weights": "full", "training": {"epoch": 2}, "evaluation": {}}
    for epoch, shift in ((1, 0.0), (2, 1.0)):
        write_checkpoint(run / f"epoch_{epoch:03d}.safetensors",
                         {k: v + shift if v.is_floating_point() else v for k, v in base.items()},
                         card)
    (run / "log.csv").write_text("epoch,loss\n1,1.0\n2,0.5\n")
    (run / "training.png").write_bytes(b"png")
    _script().average(run, tmp_path / "avg", [1, 2])
    averaged = read_weights(tmp_path / "avg" / "best.safetensors")
    torch.testing.assert_close(averaged["text_projection"], base["text_projection"] + 0.5)
    loaded = load_model(str(tmp_path / "avg" / "best.safetensors"), device="cpu")
    assert loaded.card["training"]["averaged_epochs"] == [1, 2]
