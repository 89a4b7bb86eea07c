"""The InfoNCE (CLIP) loss: symmetric cross-entropy over the in-batch similarity matrix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07, stored as a log
MAX_LOGIT_SCALE = 100.0


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; row i of each is a positive pair.

    image_features, text_features: (n, d), L2-normalised. logit_scale: the learnable log of
    the inverse temperature; its exponent is clamped at 100 as in CLIP so training stays stable.
    """
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    logits_per_image = scale * image_features @ text_features.T  # (n, n)
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_image.T, labels)) / 2
