"""Split a dual encoder into a frozen part (run once, cached) and a trainable part.

With a locked image trunk, training only needs the trunk's pooled features once per image;
with the lower text layers locked, it needs their hidden states once per caption. Caching
those turns an epoch on two CPU cores from ~14 minutes into seconds. The split functions
here must equal the model's own forward, which tests check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput

from retrieval.models.clip import ClipModel


@dataclass
class Split:
    """frozen(inputs) -> cached features; trainable(features) -> embeddings."""

    frozen: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    trainable: Callable[..., torch.Tensor]
    modules: list[torch.nn.Module]  # the modules whose parameters train
    # frozen features -> the trunk's pooled features as pretrained (image towers only):
    # what the tower's own ImageNet classifier reads (retrieval/imagenet.py)
    pooled: Callable[[torch.Tensor], torch.Tensor] | None = None


def split_image_tower(clip: ClipModel, unlocked_stages: int = 0) -> Split | None:
    """Trunk frozen up to its last `unlocked_stages` stages; those, the final convolution
    and the projection head train. None when the tower is not a timm trunk.

    Batch-norm layers of unlocked stages keep their ImageNet statistics (see
    `freeze_batch_norm`): small contrastive batches would make them noisy.
    """
    visual = clip.model.visual
    if not (hasattr(visual, "trunk") and hasattr(visual, "head")):
        return None
    trunk = visual.trunk
    if unlocked_stages == 0:
        return Split(frozen=trunk, trainable=visual.head, modules=[visual.head],
                     pooled=lambda features: features)
    if not all(hasattr(trunk, name) for name in ("blocks", "conv_head", "bn2", "forward_head")):
        raise ValueError(f"{clip.arch}: unlocking image stages needs an EfficientNet-style trunk")
    stages = list(trunk.blocks)
    if not 0 < unlocked_stages <= len(stages):
        raise ValueError(f"unlocked image stages must be 0..{len(stages)}, got {unlocked_stages}")
    cut = len(stages) - unlocked_stages

    def frozen(pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, H, W) -> (n, C, h, w)
        return trunk.blocks[:cut](trunk.bn1(trunk.conv_stem(pixels)))

    def pooled(features: torch.Tensor) -> torch.Tensor:  # (n, C, h, w) -> (n, 1280)
        return trunk.forward_head(trunk.bn2(trunk.conv_head(trunk.blocks[cut:](features))))

    def trainable(features: torch.Tensor) -> torch.Tensor:  # (n, C, h, w) -> (n, d)
        return visual.head(pooled(features))

    return Split(frozen=frozen, trainable=trainable,
                 modules=[*stages[cut:], trunk.conv_head, trunk.bn2, visual.head],
                 pooled=pooled)


def freeze_batch_norm(modules: list[torch.nn.Module]) -> None:
    """Put batch-norm layers in eval mode so their running statistics stay fixed."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.eval()


def _text_layers(clip: ClipModel) -> list[torch.nn.Module]:
    return list(clip.model.text.transformer.encoder.layer)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, L) 1/0 mask -> (n, 1, 1, L) additive mask, the form BERT layers accept."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _run_layers(layers: list[torch.nn.Module], hidden: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    extended = _additive_mask(mask, hidden.dtype)
    for layer in layers:
        out = layer(hidden, attention_mask=extended)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def split_text_tower(clip: ClipModel, unlocked_layers: int) -> Split | None:
    """Embeddings and the lower layers frozen; the top `unlocked_layers`, pooler and
    projection trainable. None for towers other than open_clip's HF text encoder."""
    text = getattr(clip.model, "text", None)
    if text is None or not hasattr(text, "transformer"):
        return None
    layers = _text_layers(clip)
    if not 0 <= unlocked_layers <= len(layers):
        raise ValueError(f"unlocked text layers must be 0..{len(layers)}, got {unlocked_layers}")
    cut = len(layers) - unlocked_layers
    pad = clip.pad_token_id

    def frozen(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (tokens != pad).long()
        hidden = text.transformer.embeddings(input_ids=tokens)
        return _run_layers(layers[:cut], hidden, mask), mask

    def trainable(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = _run_layers(layers[cut:], hidden, mask)
        pooled = text.pooler(BaseModelOutput(last_hidden_state=hidden), mask)
        return text.proj(pooled)

    return Split(frozen=frozen, trainable=trainable, modules=[*layers[cut:], text.proj])
