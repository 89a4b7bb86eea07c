"""The InfoNCE (CLIP) loss: symmetric cross-entropy over the in-batch similarity matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def soft_target_loss(image_features: torch.Tensor, class_features: torch.Tensor,
                     logit_scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of image -> class-prompt similarities against a soft target
    (a teacher's class distribution): image_features (n, d) and class_features (m, d)
    L2-normalised, target (n, m) rows summing to 1."""
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    log_probs = F.log_softmax(scale * image_features @ class_features.T, dim=1)  # (n, m)
    return -(target * log_probs).sum(dim=1).mean()
