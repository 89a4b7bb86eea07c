"""How a training run is configured: one frozen dataclass, filled from flags at the edge
(clipdex/commands/models.py generates the flags from its fields)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07, stored as a log
# (here, not in loss.py: the command line reads this config without importing torch)


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    accum_steps: int = 1
    lock_image: bool = True  # image trunk frozen and cached; False trains it (a GPU job)
    unlocked_text_layers: int = 2  # top text layers that train; the rest are frozen
    unlocked_image_stages: int = 0  # top image trunk stages that train (cached below them)
    init_logit_scale: float = INIT_LOGIT_SCALE
    precision: str = "auto"
    workers: int | None = None
    seed: int = 0
    resume: bool = False
    command: str = ""
    data_note: str = ""
    cache_dir: Path | None = None  # where frozen image features are kept between runs
    image_views: int = 1  # cached views per image: 1 = as preprocessed, 2 adds its mirror, …
    imagenet_weight: float = 0.0  # weight of the ImageNet pseudo-label term (imagenet.py)
    imagenet_classes: int = 128  # class prompts per step in that term
