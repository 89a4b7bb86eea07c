"""ImageNet's vocabulary as a second teacher: the image tower's own classifier labels each
training image, and the joint space learns to rank the prompts of those classes.

Flickr8k's captions mention people and dogs; the EfficientNet tower already knows 1,000
ImageNet classes. For each training image the frozen tower's classifier gives a
distribution over them (computed once, from the cached features); each step the image
embeddings are asked to reproduce that distribution over the text embeddings of
"a photo of a {class}." prompts (a sampled subset of classes, so a step stays cheap). This
adds words for cats, cups and rockets that no caption has, without any extra images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retrieval.models.clip import ClipModel
from retrieval.models.loading import read_image_tower
from retrieval.models.text import trim_padding
from retrieval.training.features import pad_hidden
from retrieval.training.loss import soft_target_loss
from retrieval.training.towers import Split

PROMPT = "a photo of a {}."


def class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in classifier order (the first WordNet lemma)."""
    import timm

    info = timm.data.ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]


def classifier_of(clip: ClipModel) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(1000, C) weight and (1000,) bias of the image tower's ImageNet head, from its wheel;
    None for towers that have none (open_clip models)."""
    package = clip.config.get("towers", {}).get("image")
    if package is None:
        return None
    state = read_image_tower(package)
    return state["classifier.weight"], state["classifier.bias"]


@dataclass
class ImageNetTargets:
    """Teacher distributions per training image and the cached prompts of every class."""

    probs: torch.Tensor  # (n_images, 1000) float32, the frozen classifier's softmax
    prompt_hidden: list[torch.Tensor]  # per class: frozen text features (length, width)
    classes_per_step: int

    def sample(self, rows: list[int], rng: random.Random) -> list[int]:
        """The batch's top-1 classes, then random others, `classes_per_step` in all."""
        chosen = list(dict.fromkeys(self.probs[rows].argmax(dim=1).tolist()))
        chosen = chosen[:self.classes_per_step]
        taken = set(chosen)
        others = [c for c in range(self.probs.shape[1]) if c not in taken]
        return chosen + rng.sample(others, self.classes_per_step - len(chosen))

    def loss(self, clip: ClipModel, text: Split, rows: list[int], image_emb: torch.Tensor,
             rng: random.Random) -> torch.Tensor:
        """Soft cross-entropy of image -> sampled class prompts against the teacher."""
        classes = self.sample(rows, rng)
        hidden, mask = pad_hidden([self.prompt_hidden[c] for c in classes], clip.device)
        class_emb = F.normalize(text.trainable(hidden, mask).float(), dim=-1)  # (m, d)
        target = self.probs[rows][:, classes].to(clip.device)  # (n, m)
        target = target / target.sum(dim=1, keepdim=True).clamp_min(1e-8)
        return soft_target_loss(image_emb, class_emb, clip.model.logit_scale, target)


def teacher_probs(clip: ClipModel, split: Split, features: torch.Tensor,
                  head: tuple[torch.Tensor, torch.Tensor], batch: int = 256) -> torch.Tensor:
    """(n, 1000) softmax of the frozen tower's classifier on cached image features."""
    weight, bias = (t.to(clip.device) for t in head)
    out = []
    with torch.inference_mode():
        for start in range(0, len(features), batch):
            cached = features[start:start + batch].to(clip.device, torch.float32)
            if clip.channels_last and cached.ndim == 4:
                cached = cached.contiguous(memory_format=torch.channels_last)
            pooled = split.pooled(cached)  # (b, C)
            out.append((pooled @ weight.T + bias).softmax(dim=1).float().cpu())
    return torch.cat(out)


def prompt_features(clip: ClipModel, text: Split, names: list[str]) -> list[torch.Tensor]:
    tokens = trim_padding(clip.tokenizer([PROMPT.format(n) for n in names]), clip.pad_token_id)
    with torch.inference_mode():
        hidden, mask = text.frozen(tokens.to(clip.device))
    return [h[:n].float().cpu() for h, n in zip(hidden, mask.sum(dim=1).tolist())]


def prepare_targets(clip: ClipModel, image: Split | None, text: Split | None,
                    features: torch.Tensor | None, classes_per_step: int
                    ) -> ImageNetTargets | None:
    """Teacher distributions for cached image features; None when the towers cannot give
    them (no ImageNet head, image features not cached, or a text tower without a split)."""
    head = classifier_of(clip)
    if head is None or image is None or image.pooled is None or text is None or features is None:
        return None
    probs = teacher_probs(clip, image, features, head)
    return ImageNetTargets(probs, prompt_features(clip, text, class_names()),
                           min(classes_per_step, probs.shape[1]))
