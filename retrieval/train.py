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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from retrieval import card as model_card
from retrieval.encode import autocast_for, trim_padding
from retrieval.errors import CheckpointError, ManifestError
from retrieval.loss import INIT_LOGIT_SCALE, clip_loss
from retrieval.manifest import Manifest, Problem
from retrieval.metrics import retrieval_metrics
from retrieval.model import ClipModel, describe
from retrieval.pipeline import iter_image_batches
from retrieval.towers import split_image_tower, split_text_tower


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    accum_steps: int = 1
    lock_image: bool = True  # image trunk frozen (its projection head still trains)
    unlocked_text_layers: int = 2  # top text layers that train; the rest are frozen
    init_logit_scale: float = INIT_LOGIT_SCALE
    precision: str = "auto"
    workers: int | None = None
    seed: int = 0
    resume: bool = False
    command: str = ""
    data_note: str = ""
    cache_dir: Path | None = None  # where frozen image features are kept between runs


@dataclass
class Features:
    """Cached inputs of the trainable parts for one manifest (train or validation)."""

    image: torch.Tensor  # (n_images, F) trunk features
    text_hidden: list[torch.Tensor]  # per caption: (length, width) hidden states
    text_to_image: np.ndarray  # (n_texts,)
    captions_of: list[list[int]]  # per image: its caption rows


def _cache_key(clip: ClipModel, paths: list[Path]) -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps([clip.arch, clip.init, clip.config.get("preprocess_cfg"),
                                        [str(p) for p in paths]]).encode())
    return digest.hexdigest()[:20]


def _cache_images(clip: ClipModel, manifest: Manifest, config: TrainConfig
                  ) -> tuple[torch.Tensor, list[int], list[Problem]]:
    """Trunk features of every decodable image, from the disk cache when it has them."""
    paths = [item.image for item in manifest.items]
    cached = None
    if config.cache_dir:
        cached = Path(config.cache_dir) / f"image-features-{_cache_key(clip, paths)}"
        if (cached / "kept.npy").exists():
            problems = [Problem(**row) for row in
                        json.loads((cached / "problems.json").read_text())]
            return (torch.from_numpy(np.load(cached / "features.npy")),
                    np.load(cached / "kept.npy").tolist(), problems)
    features, kept, problems = _compute_image_features(clip, paths, manifest, config)
    if cached:
        cached.mkdir(parents=True, exist_ok=True)
        np.save(cached / "features.npy", features.numpy())
        (cached / "problems.json").write_text(json.dumps([asdict(p) for p in problems]))
        np.save(cached / "kept.npy", np.asarray(kept, dtype=np.int64))  # written last: complete
    return features, kept, problems


def _compute_image_features(clip: ClipModel, paths: list[Path], manifest: Manifest,
                            config: TrainConfig) -> tuple[torch.Tensor, list[int], list[Problem]]:
    split = split_image_tower(clip)
    if split is None:
        raise CheckpointError(f"{clip.arch}: feature caching needs a timm image trunk")
    chunks, kept, problems = [], [], []
    bar = tqdm(total=len(paths), desc=f"image features {manifest.source.name}", unit="img")
    for batch in iter_image_batches(paths, clip.preprocess, 64, config.workers):
        if batch.indices:
            with torch.inference_mode(), autocast_for(clip.device, config.precision):
                chunks.append(split.frozen(batch.pixels.to(clip.device)).float().cpu())
            kept.extend(batch.indices)
        problems.extend(p for _, p in batch.problems)
        bar.update(len(batch.indices) + len(batch.problems))
    bar.close()
    return torch.cat(chunks), kept, problems


def _cache_texts(clip: ClipModel, texts: list[str], unlocked: int) -> list[torch.Tensor]:
    split = split_text_tower(clip, unlocked)
    if split is None:
        raise CheckpointError(f"{clip.arch}: feature caching needs an HF text tower")
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, len(texts), 256), desc="text features", unit="batch"):
        tokens = trim_padding(clip.tokenizer(texts[start:start + 256]), clip.pad_token_id)
        with torch.inference_mode():
            hidden, mask = split.frozen(tokens.to(clip.device))
        lengths = mask.sum(dim=1).tolist()
        out.extend(h[:n].to(torch.float16).cpu() for h, n in zip(hidden, lengths))
    return out


def cache_features(clip: ClipModel, manifest: Manifest, config: TrainConfig
                   ) -> tuple[Features, list[Problem]]:
    image, kept, problems = _cache_images(clip, manifest, config)
    items = [manifest.items[i] for i in kept]
    texts, text_to_image, captions_of = [], [], []
    for row, item in enumerate(items):
        captions_of.append(list(range(len(texts), len(texts) + len(item.captions))))
        texts.extend(item.captions)
        text_to_image.extend([row] * len(item.captions))
    hidden = _cache_texts(clip, texts, config.unlocked_text_layers)
    return Features(image, hidden, np.asarray(text_to_image), captions_of), problems


def _pad_hidden(hidden: list[torch.Tensor], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length cached hidden states into (n, L, w) plus an (n, L) mask."""
    length = max(h.shape[0] for h in hidden)
    batch = torch.zeros(len(hidden), length, hidden[0].shape[1])
    mask = torch.zeros(len(hidden), length, dtype=torch.long)
    for row, h in enumerate(hidden):
        batch[row, :h.shape[0]] = h.float()
        mask[row, :h.shape[0]] = 1
    return batch.to(device), mask.to(device)


def embed_features(clip: ClipModel, config: TrainConfig, feats: Features,
                   image_rows: list[int] | None = None, text_rows: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the trainable parts on cached features; returns normalised (n, d) embeddings."""
    image_split = split_image_tower(clip)
    text_split = split_text_tower(clip, config.unlocked_text_layers)
    images = feats.image if image_rows is None else feats.image[image_rows]
    hidden = feats.text_hidden if text_rows is None else [feats.text_hidden[r] for r in text_rows]
    image_emb = image_split.trainable(images.to(clip.device))
    text_emb = text_split.trainable(*_pad_hidden(hidden, clip.device))
    return F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)


def evaluate_features(clip: ClipModel, config: TrainConfig, feats: Features) -> dict[str, float]:
    clip.model.eval()
    image_chunks, text_chunks = [], []
    with torch.inference_mode():
        for start in range(0, len(feats.image), 512):
            rows = list(range(start, min(start + 512, len(feats.image))))
            image_chunks.append(embed_features(clip, config, feats, rows, [0])[0])
        for start in range(0, len(feats.text_hidden), 512):
            rows = list(range(start, min(start + 512, len(feats.text_hidden))))
            text_chunks.append(embed_features(clip, config, feats, [0], rows)[1])
    return retrieval_metrics(torch.cat(image_chunks).cpu().numpy(),
                             torch.cat(text_chunks).cpu().numpy(), feats.text_to_image)


def prepare_model(clip: ClipModel, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the trainable parts and the temperature."""
    model = clip.model
    for parameter in model.parameters():
        parameter.requires_grad = False
    modules = (split_image_tower(clip).modules
               + split_text_tower(clip, config.unlocked_text_layers).modules)
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad = True
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
          log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Train on cached frozen features; returns the best epoch's model card."""
    if not config.lock_image:
        raise CheckpointError("training an unlocked image trunk needs a GPU run; "
                              "on CPU keep --lock-image (the default)")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if not config.resume and (out / "last.safetensors").exists():
        raise CheckpointError(f"{out} already holds a run; pass --resume to continue it "
                              "or choose another --out")
    clip.model.logit_scale.data.fill_(config.init_logit_scale)
    params = prepare_model(clip, config)
    train_feats, train_problems = cache_features(clip, train_set, config)
    val_feats, val_problems = cache_features(clip, val_set, config)
    problems = list(train_set.problems) + train_problems + list(val_set.problems) + val_problems
    with open(out / "errors.jsonl", "w") as handle:
        handle.writelines(problem.as_json() + "\n" for problem in problems)
    if len(train_feats.image) < 2:
        raise ManifestError(f"{train_set.source}: fewer than 2 usable images to train on")
    usable = [row for row, caps in enumerate(train_feats.captions_of) if caps]
    steps_per_epoch = max(1, len(usable) // config.batch_size // config.accum_steps)
    done = _finished_epochs(out) if config.resume else 0
    optimizer, scheduler = make_optimizer(clip.model, config, steps_per_epoch * config.epochs,
                                          start_step=done * steps_per_epoch)
    start_epoch, history, best, seconds = _load_resume_state(out, clip, optimizer) \
        if config.resume else (0, [], -1.0, 0.0)
    log(f"{len(params)} trainable tensors, {sum(p.numel() for p in params):,} parameters; "
        f"{len(usable)} training images, {steps_per_epoch} steps per epoch")
    best_card: dict[str, Any] = {}
    for epoch in range(start_epoch + 1, config.epochs + 1):
        rng_epoch = random.Random(config.seed * 1000 + epoch)
        started = time.perf_counter()
        loss_sum = _train_epoch(clip, config, train_feats, usable, optimizer, scheduler,
                                rng_epoch, params, epoch, steps_per_epoch)
        metrics = evaluate_features(clip, config, val_feats)
        seconds += time.perf_counter() - started
        row = {"epoch": epoch, "loss": round(loss_sum / steps_per_epoch, 4),
               "temperature": round(1 / clip.model.logit_scale.exp().item(), 4),
               **{k: round(v, 2) for k, v in metrics.items() if "_R@" in k}}
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
    del rng
    return best_card or model_card.read_card(out / "best.safetensors")


def _train_precision(clip: ClipModel, config: TrainConfig) -> str:
    """bf16 autocast on CUDA (no loss scaling needed); fp32 on CPU."""
    if clip.device.type != "cuda":
        return "fp32"
    return "bf16" if config.precision == "auto" else config.precision


def _train_epoch(clip: ClipModel, config: TrainConfig, feats: Features, usable: list[int],
                 optimizer: torch.optim.Optimizer, scheduler: Any, rng: random.Random,
                 params: list[torch.nn.Parameter], epoch: int, steps: int) -> float:
    """One pass over the images, each paired with one of its captions drawn at random."""
    order = usable[:]
    rng.shuffle(order)
    for module in (split_image_tower(clip).modules
                   + split_text_tower(clip, config.unlocked_text_layers).modules):
        module.train()
    total = 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{config.epochs}", unit="step", leave=False)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        for micro in range(config.accum_steps):
            start = (step * config.accum_steps + micro) * config.batch_size
            images = order[start:start + config.batch_size]
            texts = [rng.choice(feats.captions_of[row]) for row in images]
            with autocast_for(clip.device, _train_precision(clip, config)):
                image_emb, text_emb = embed_features(clip, config, feats, images, texts)
                loss = clip_loss(image_emb, text_emb, clip.model.logit_scale)
            (loss / config.accum_steps).backward()
            total += loss.item() / config.accum_steps
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            clip.model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    clip.model.eval()
    return total
