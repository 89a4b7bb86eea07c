"""InfoNCE training and fine-tuning of a dual encoder, with frozen-feature caching.

Locked parts of the towers are run once and cached (see towers.py); each step then runs
only the trainable top. Every epoch writes a checkpoint with its model card, evaluates on
the validation split, appends to log.csv and redraws training.png; `resume` continues
from the last finished epoch.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import CheckpointError, ManifestError, ModelLoadError
from retrieval.inputs.captions import Manifest, Skipped
from retrieval.models import card as model_card
from retrieval.models.clip import ClipModel
from retrieval.models.inference import autocast_for
from retrieval.models.loading import describe
from retrieval.progress import ProgressFactory, no_progress
from retrieval.training.config import TrainConfig
from retrieval.training.features import (
    Features,
    embed_images,
    embed_texts,
    evaluate_features,
    image_split,
    prepare_features,
    step_batches,
    text_split,
)
from retrieval.training.imagenet import ImageNetTargets, prepare_targets
from retrieval.training.loss import clip_loss
from retrieval.training.towers import freeze_batch_norm


def trainable_modules(clip: ClipModel, config: TrainConfig) -> list[torch.nn.Module]:
    """The modules that train: split tops, or whole towers where nothing is cached."""
    image, text = image_split(clip, config), text_split(clip, config)
    modules = image.modules if image is not None else [clip.model.visual]
    if text is not None:
        return modules + text.modules
    return modules + [module for name, module in clip.model.named_children()
                      if name in ("transformer", "token_embedding", "ln_final")]


def prepare_model(clip: ClipModel, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the trainable parts and the temperature."""
    if clip.onnx is not None:  # its exported towers would not follow the weights trained
        raise ModelLoadError("training needs a model loaded with backend='torch'")
    model = clip.model
    for parameter in model.parameters():
        parameter.requires_grad = False
    for module in trainable_modules(clip, config):
        for parameter in module.parameters():
            parameter.requires_grad = True
    if text_split(clip, config) is None:  # open_clip's own text tower: its lock does the rest
        for name in ("positional_embedding", "text_projection"):
            if isinstance(getattr(model, name, None), torch.nn.Parameter):
                getattr(model, name).requires_grad = True
        layers = len(model.transformer.resblocks)
        if config.unlocked_text_layers < layers:
            model.lock_text_tower(unlocked_layers=config.unlocked_text_layers)
    model.logit_scale.requires_grad = True
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, total_steps: int,
                   start_step: int = 0
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay on gains, biases and the temperature; warm-up then cosine.

    `start_step` shifts the schedule so a resumed run continues where it stopped.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            plain = parameter.ndim < 2 or "logit_scale" in name or "LayerNorm" in name
            (no_decay if plain else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, int(config.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        step += start_step
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_state(clip: ClipModel) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in clip.model.named_parameters() if p.requires_grad}


def _card(clip: ClipModel, config: TrainConfig, epoch: int, metrics: dict[str, Any],
          history: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return {
        **describe(clip), "weights": "partial",
        "training": {"recipe": {k: (str(v) if isinstance(v, Path) else v)
                                for k, v in asdict(config).items()},
                     "data": config.data_note, "epoch": epoch, "seconds": round(seconds, 1),
                     "hardware": f"{platform.processor() or platform.machine()}, "
                                 f"{torch.get_num_threads()} threads, {clip.device}",
                     "torch": torch.__version__, "history": history},
        "command": config.command or " ".join(sys.argv),
        "evaluation": {"validation": metrics},
    }


def _save_resume_state(out: Path, optimizer: torch.optim.Optimizer, epoch: int,
                       history: list[dict[str, Any]], best: float, seconds: float) -> None:
    state = optimizer.state_dict()
    tensors = {f"{pid}.{key}": value for pid, slots in state["state"].items()
               for key, value in slots.items() if torch.is_tensor(value)}
    model_card.write_checkpoint(out / "optimizer.safetensors", tensors, {
        "arch": "optimizer", "init": "-", "weights": "optimizer", "embed_dim": 0,
        "param_groups": state["param_groups"], "epoch": epoch, "history": history,
        "best": best, "seconds": seconds,
    })


def _finished_epochs(out: Path) -> int:
    path = out / "optimizer.safetensors"
    return int(model_card.read_card(path)["epoch"]) if path.exists() else 0


def _load_resume_state(out: Path, clip: ClipModel, optimizer: torch.optim.Optimizer
                       ) -> tuple[int, list[dict[str, Any]], float, float]:
    path = out / "optimizer.safetensors"
    if not (path.exists() and (out / "last.safetensors").exists()):
        return 0, [], -1.0, 0.0
    meta = model_card.read_card(path)
    clip.model.load_state_dict(model_card.read_weights(out / "last.safetensors"), strict=False)
    tensors = model_card.read_weights(path)
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        slots.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    return int(meta["epoch"]), meta["history"], float(meta["best"]), float(meta["seconds"])


def write_log(out: Path, history: list[dict[str, Any]]) -> None:
    """log.csv (one row per epoch) and training.png (loss and validation Recall@K)."""
    keys = list(history[0])
    with open(out / "log.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["loss"] for row in history], marker="o")
    left.set(title="training loss (InfoNCE)", xlabel="epoch")
    for key in [k for k in keys if "_R@" in k]:
        right.plot(epochs, [row[key] for row in history], marker="o", label=key)
    right.set(title="validation Recall@K (%)", xlabel="epoch")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=100)
    plt.close(fig)


def _score(metrics: dict[str, float]) -> float:
    """Model selection: the sum of the six Recall@K figures ("rsum")."""
    return sum(v for k, v in metrics.items() if "_R@" in k)


def train(clip: ClipModel, train_set: Manifest, val_set: Manifest, config: TrainConfig,
          log: Callable[[str], None] = lambda message: None,
          progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Train with InfoNCE; returns the model card of the best epoch on the validation set."""
    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if not config.resume and (out / "last.safetensors").exists():
        raise CheckpointError(f"{out} already holds a run; pass --resume to continue it "
                              "or choose another --out")
    clip.model.logit_scale.data.fill_(config.init_logit_scale)
    params = prepare_model(clip, config)
    train_feats, train_problems = prepare_features(clip, train_set, config, config.image_views,
                                                   progress)
    val_feats, val_problems = prepare_features(clip, val_set, config, progress=progress)
    targets = _imagenet_targets(clip, config, train_feats)
    report = _ErrorReport(out / "errors.jsonl", list(train_set.problems) + train_problems
                          + list(val_set.problems) + val_problems)
    usable = [row for row, caps in enumerate(train_feats.captions_of) if caps]
    if len(usable) < 2:
        raise ManifestError(f"{train_set.source}: fewer than 2 usable captioned images")
    steps_per_epoch = max(1, len(usable) // (config.batch_size * config.accum_steps))
    done = _finished_epochs(out) if config.resume else 0
    optimizer, scheduler = make_optimizer(clip.model, config, steps_per_epoch * config.epochs,
                                          start_step=done * steps_per_epoch)
    start_epoch, history, best, seconds = _load_resume_state(out, clip, optimizer) \
        if config.resume else (0, [], -1.0, 0.0)
    log(f"{len(params)} trainable tensors, {sum(p.numel() for p in params):,} parameters; "
        f"{len(usable)} training images, {steps_per_epoch} steps per epoch")
    best_card: dict[str, Any] = {}
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        loss, imagenet_loss = _train_epoch(clip, config, train_feats, usable, optimizer,
                                           scheduler, params, epoch, steps_per_epoch, report,
                                           targets, progress)
        metrics = evaluate_features(clip, config, val_feats)
        seconds += time.perf_counter() - started
        row = _log_row(clip, epoch, loss, imagenet_loss if targets else None, metrics)
        history.append(row)
        card = _card(clip, config, epoch, metrics, history, seconds)
        state = trainable_state(clip)
        model_card.write_checkpoint(out / f"epoch_{epoch:03d}.safetensors", state, card)
        if _score(metrics) > best:
            best = _score(metrics)
            best_card = model_card.write_checkpoint(out / "best.safetensors", state, card)
        model_card.write_checkpoint(out / "last.safetensors", state, card)
        _save_resume_state(out, optimizer, epoch, history, best, seconds)
        write_log(out, history)
        log(json.dumps(row))
    return best_card or model_card.read_card(out / "best.safetensors")


def _log_row(clip: ClipModel, epoch: int, loss: float, imagenet_loss: float | None,
             metrics: dict[str, float]) -> dict[str, Any]:
    """One row of log.csv: losses, temperature and the validation Recall@K figures."""
    extra = {} if imagenet_loss is None else {"imagenet_loss": round(imagenet_loss, 4)}
    return {"epoch": epoch, "loss": round(loss, 4), **extra,
            "temperature": round(1 / clip.model.logit_scale.exp().item(), 4),
            **{k: round(v, 2) for k, v in metrics.items() if "_R@" in k}}


def _imagenet_targets(clip: ClipModel, config: TrainConfig, feats: Features
                      ) -> ImageNetTargets | None:
    """The ImageNet pseudo-label term's teacher, when asked for (imagenet_weight > 0)."""
    if config.imagenet_weight <= 0:
        return None
    targets = prepare_targets(clip, image_split(clip, config), text_split(clip, config),
                              feats.image, config.imagenet_classes)
    if targets is None:
        raise ModelLoadError(f"{clip.arch}: the ImageNet term needs an EfficientNet-Lite image "
                             "tower with cached features and a Hugging Face text tower")
    return targets


class _ErrorReport:
    """errors.jsonl: every skipped input with its reason, each written once."""

    def __init__(self, path: Path, problems: list[Skipped]):
        self.path, self.seen = path, set()
        path.write_text("")
        self.add(problems)

    def add(self, problems: list[Skipped]) -> None:
        fresh = [p for p in problems if (p.path, p.reason) not in self.seen]
        self.seen.update((p.path, p.reason) for p in fresh)
        with open(self.path, "a") as handle:
            handle.writelines(problem.as_json() + "\n" for problem in fresh)


def _train_precision(clip: ClipModel, config: TrainConfig) -> str:
    """bf16 autocast on CUDA (no loss scaling needed); fp32 on CPU."""
    if clip.device.type != "cuda":
        return "fp32"
    return "bf16" if config.precision == "auto" else config.precision


def _train_epoch(clip: ClipModel, config: TrainConfig, feats: Features, usable: list[int],
                 optimizer: torch.optim.Optimizer, scheduler: Any,
                 params: list[torch.nn.Parameter], epoch: int, steps: int,
                 report: _ErrorReport, targets: ImageNetTargets | None = None,
                 progress: ProgressFactory = no_progress) -> tuple[float, float]:
    """One pass over the images, each paired with one of its captions drawn at random.

    Returns the mean InfoNCE loss and ImageNet-term loss per optimizer step.
    """
    rng = random.Random(config.seed * 1000 + epoch)  # the same order when an epoch is redone
    class_rng = random.Random(config.seed * 1000 + epoch + 1)  # captions drawn as without it
    view_rng = random.Random(config.seed * 1000 + epoch + 2)  # the same, with or without views
    order = usable[:]
    rng.shuffle(order)
    modules = trainable_modules(clip, config)
    for module in modules:
        module.train()
    freeze_batch_norm(modules)
    batches = step_batches(clip, config, feats, order)
    total, extra, count = 0.0, 0.0, 0
    bar = progress(f"epoch {epoch}/{config.epochs}", steps)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for _micro in range(config.accum_steps):
            rows, pixels, problems = next(batches)
            report.add(problems)
            texts = [rng.choice(feats.captions_of[row]) for row in rows]
            views = [view_rng.randrange(1 + len(feats.image_views)) for _ in rows]
            with autocast_for(clip.device, _train_precision(clip, config)):
                image_emb = embed_images(clip, config, feats, rows, pixels, views)
                text_emb = embed_texts(clip, config, feats, texts)
                loss = clip_loss(image_emb, text_emb, clip.model.logit_scale)
                imagenet = targets.loss(clip, text_split(clip, config), rows, image_emb,
                                        class_rng) if targets else torch.zeros(())
            ((loss + config.imagenet_weight * imagenet) / config.accum_steps).backward()
            total += loss.item() / config.accum_steps
            extra += imagenet.item() / config.accum_steps
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            clip.model.logit_scale.clamp_(0, math.log(100))
        count += 1
        bar.update(1)
    bar.close()
    batches.close()
    clip.model.eval()
    return total / max(count, 1), extra / max(count, 1)
