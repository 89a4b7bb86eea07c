"""`clipdex train`, `eval`, `encode` and `demo`: the jobs that load a model and run it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.options import (
    Flag,
    config_flags,
    config_from,
    log,
    model_options,
    tqdm_progress,
)
from retrieval.models.choices import PRECISIONS

TRAIN_FLAGS = {
    "out": Flag("run folder (checkpoints, log)"),
    "warmup_fraction": Flag("warm-up fraction of steps", name="--warmup"),
    "accum_steps": Flag("gradient accumulation"),
    "lock_image": Flag("train the image trunk too (GPU runs; not cached)",
                       invert="--unlock-image"),
    "unlocked_text_layers": Flag("top text transformer layers to train (0 = projection only)"),
    "unlocked_image_stages": Flag("top image trunk stages to train, on cached features below "
                                  "them"),
    "init_logit_scale": Flag("the temperature's starting log-scale"),
    "precision": Flag("autocast precision", choices=PRECISIONS),
    "workers": Flag("image decoding processes"),
    "resume": Flag("continue the run in --out"),
    "cache_dir": Flag("keep frozen image features here to reuse across runs"),
    "data_note": Flag("words for the model card's data field"),
    "image_views": Flag("cached views per training image (augmentation): 1 = as "
                        "preprocessed, 2 adds its mirror, more add random crops"),
    "imagenet_weight": Flag("weight of the ImageNet pseudo-label term: the image tower's own "
                            "classifier teaches class-name prompts (0 = off)"),
    "imagenet_classes": Flag("class prompts per step in the ImageNet term"),
}
TRAIN_SET_ELSEWHERE = frozenset({"command"})  # the command line itself, for the model card


def register(sub: argparse._SubParsersAction) -> None:
    from retrieval.training.config import TrainConfig

    train = sub.add_parser("train", help="train or fine-tune a dual encoder with InfoNCE")
    _manifest_options(train)
    _manifest_options(train, "val")
    _column_options(train)
    model_options(train, backend=False)
    config_flags(train, TrainConfig, TRAIN_FLAGS, skip=TRAIN_SET_ELSEWHERE)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="Recall@K both ways and zero-shot accuracy")
    _manifest_options(evaluate)
    _column_options(evaluate)
    model_options(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--workers", type=int, default=None)
    evaluate.add_argument("--json", type=Path, default=None, help="also write the results here")
    evaluate.add_argument("--calibrate", action="store_true",
                          help="also fit the relevance calibration on this set (use the "
                               "validation split) and store it in the model's card")
    evaluate.set_defaults(func=cmd_eval)

    encode = sub.add_parser("encode", help="encode texts or images to a .npy file")
    model_options(encode)
    group = encode.add_mutually_exclusive_group(required=True)
    group.add_argument("--texts", nargs="+")
    group.add_argument("--images", nargs="+", type=Path)
    encode.add_argument("--out", type=Path, required=True, help="output .npy (n, d) float32")
    encode.set_defaults(func=cmd_encode)

    demo = sub.add_parser("demo", help="rank the demo corpus for text queries")
    model_options(demo)
    demo.add_argument("--corpus", type=Path, default=None, help="demo corpus folder")
    demo.add_argument("-k", type=int, default=5)
    demo.add_argument("query", nargs="+")
    demo.set_defaults(func=cmd_demo)


def _manifest_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    dash = f"--{prefix}-" if prefix else "--"
    parser.add_argument(f"{dash}manifest", type=Path, required=not prefix,
                        help="CSV / JSONL / parquet with an image column and captions")
    parser.add_argument(f"{dash}image-root", type=Path, default=None,
                        help="folder that relative image paths resolve against "
                             "(default: the manifest's folder)")
    parser.add_argument(f"{dash}split", type=Path, default=None,
                        help="a file of image names (one a line) to keep, e.g. Flickr8k test.txt")


def _column_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-column", default=None, help="column with image paths")
    parser.add_argument("--caption-column", default=None, help="column with captions")


def _read(args: argparse.Namespace, prefix: str = ""):
    """The training or validation manifest; validation falls back to the training file."""
    from retrieval.inputs.captions import read_manifest, read_split

    key = f"{prefix}_" if prefix else ""
    manifest = getattr(args, f"{key}manifest") or args.manifest
    root = getattr(args, f"{key}image_root") or args.image_root
    split_file = getattr(args, f"{key}split")
    split = read_split(split_file) if split_file else None
    return read_manifest(manifest, image_root=root, split=split,
                         image_column=args.image_column, caption_column=args.caption_column)


def cmd_train(args: argparse.Namespace) -> int:
    from retrieval.models.loading import load_model
    from retrieval.training.config import TrainConfig
    from retrieval.training.train import train

    config = config_from(args, TrainConfig, command=args.command_line)
    clip = load_model(args.model, args.device)
    train_set, val_set = _read(args), _read(args, "val")
    log(f"train: {len(train_set.items)} images, {train_set.num_captions} captions; "
        f"validation: {len(val_set.items)} images, {val_set.num_captions} captions")
    card = train(clip, train_set, val_set, config, log=log, progress=tqdm_progress)
    log(f"best checkpoint: {args.out / 'best.safetensors'} (epoch {card['training']['epoch']})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from retrieval.models.loading import load_model
    from retrieval.training.evaluate import embed_manifest, evaluate_embeddings

    clip = load_model(args.model, args.device, backend=args.backend)
    manifest = _read(args)
    started = time.perf_counter()
    embeddings = embed_manifest(clip, manifest, args.batch_size, args.workers)
    results: dict[str, Any] = {key: round(value, 2) for key, value in
                               evaluate_embeddings(clip, embeddings).items()}
    results["seconds"] = round(time.perf_counter() - started, 1)
    for problem in embeddings.problems:
        log(f"skipped {problem.path}: {problem.reason}")
    if args.calibrate:
        results["calibration"] = _calibrate(clip, embeddings, args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def _calibrate(clip: Any, embeddings: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Fit, report on held-out halves, and store the fit in the checkpoint's card."""
    from retrieval.errors import ModelLoadError
    from retrieval.training.calibration import calibrate, store_in_card

    if clip.source is None:
        raise ModelLoadError(f"--calibrate stores the fit in a model card: {args.model!r} is "
                             "not a clipdex checkpoint with one")
    fitted, report = calibrate(embeddings.image_emb, embeddings.text_emb,
                               embeddings.text_to_image)
    where = args.split.name if getattr(args, "split", None) else args.manifest.name
    card = store_in_card(clip.source, fitted, report, fitted_on=where)
    log(f"relevance calibration stored in {card}")
    return report


def cmd_encode(args: argparse.Namespace) -> int:
    from retrieval.models.inference import encode_images, encode_texts
    from retrieval.models.loading import load_model

    clip = load_model(args.model, args.device, backend=args.backend)
    if args.texts:
        embeddings = encode_texts(clip, args.texts)
    else:
        embeddings = encode_images(clip, args.images)
    np.save(args.out, embeddings)
    log(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} embeddings to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from retrieval.inputs.demo import demo_corpus
    from retrieval.models.loading import load_model
    from retrieval.training.evaluate import rank_images

    clip = load_model(args.model, args.device, backend=args.backend)
    corpus = demo_corpus(args.corpus)
    for query in args.query:
        print(f"\nquery: {query!r}")
        for rank, (score, item) in enumerate(rank_images(clip, corpus, query, args.k), start=1):
            print(f"  {rank}. {score:.3f}  {item.image.name:<24} {item.captions[0]}")
    return 0
