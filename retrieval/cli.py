"""The `clipdex` command line: one entry point, a subcommand per job.

Errors from the core become a one-line message on stderr and exit code 2; nothing below
this module prints or exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from retrieval.errors import ClipdexError


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (bundled), a .safetensors checkpoint, a clipdex "
                             "architecture, or an open_clip ARCH[:TAG] (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")


def _add_manifest(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    dash = f"--{prefix}-" if prefix else "--"
    parser.add_argument(f"{dash}manifest", type=Path, required=not prefix,
                        help="CSV / JSONL / parquet with an image column and captions")
    parser.add_argument(f"{dash}image-root", type=Path, default=None,
                        help="folder that relative image paths resolve against "
                             "(default: the manifest's folder)")
    parser.add_argument(f"{dash}split", type=Path, default=None,
                        help="a file of image names (one a line) to keep, e.g. Flickr8k test.txt")


def _read(args: argparse.Namespace, prefix: str = ""):
    """The training or validation manifest; validation falls back to the training file."""
    from retrieval.manifest import read_manifest, read_split

    key = f"{prefix}_" if prefix else ""
    manifest = getattr(args, f"{key}manifest") or args.manifest
    root = getattr(args, f"{key}image_root") or args.image_root
    split_file = getattr(args, f"{key}split")
    split = read_split(split_file) if split_file else None
    return read_manifest(manifest, image_root=root, split=split,
                         image_column=args.image_column, caption_column=args.caption_column)


def _add_columns(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-column", default=None, help="column with image paths")
    parser.add_argument("--caption-column", default=None, help="column with captions")


def cmd_train(args: argparse.Namespace) -> int:
    from retrieval.model import load_model
    from retrieval.train import TrainConfig, train

    config = TrainConfig(
        out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_fraction=args.warmup, accum_steps=args.accum_steps,
        lock_image=not args.unlock_image, unlocked_text_layers=args.unlocked_text_layers,
        unlocked_image_stages=args.unlocked_image_stages,
        precision=args.precision, workers=args.workers, seed=args.seed, resume=args.resume,
        command=args.command_line, data_note=args.data_note,
        cache_dir=args.cache_dir, image_views=args.image_views,
        imagenet_weight=args.imagenet_weight,
        imagenet_classes=args.imagenet_classes,
    )
    clip = load_model(args.model, args.device)
    train_set, val_set = _read(args), _read(args, "val")
    _log(f"train: {len(train_set.items)} images, {train_set.num_captions} captions; "
         f"validation: {len(val_set.items)} images, {val_set.num_captions} captions")
    card = train(clip, train_set, val_set, config, log=_log)
    _log(f"best checkpoint: {args.out / 'best.safetensors'} (epoch {card['training']['epoch']})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from retrieval.evaluate import evaluate
    from retrieval.model import load_model

    clip = load_model(args.model, args.device)
    manifest = _read(args)
    started = time.perf_counter()
    results, problems = evaluate(clip, manifest, args.batch_size, args.workers)
    results = {key: round(value, 2) for key, value in results.items()}
    results["seconds"] = round(time.perf_counter() - started, 1)
    for problem in problems:
        _log(f"skipped {problem.path}: {problem.reason}")
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from retrieval.encode import encode_images, encode_texts
    from retrieval.model import load_model

    clip = load_model(args.model, args.device)
    if args.texts:
        embeddings = encode_texts(clip, args.texts)
    else:
        embeddings = encode_images(clip, args.images)
    np.save(args.out, embeddings)
    _log(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} embeddings to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from retrieval.demo import demo_corpus, rank_images
    from retrieval.model import load_model

    clip = load_model(args.model, args.device)
    corpus = demo_corpus(args.corpus)
    for query in args.query:
        print(f"\nquery: {query!r}")
        for rank, (score, item) in enumerate(rank_images(clip, corpus, query, args.k), start=1):
            print(f"  {rank}. {score:.3f}  {item.image.name:<24} {item.captions[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipdex", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train or fine-tune a dual encoder with InfoNCE")
    _add_manifest(train)
    _add_manifest(train, "val")
    _add_columns(train)
    _add_model(train)
    train.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log)")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of steps")
    train.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation")
    train.add_argument("--unlocked-text-layers", type=int, default=2,
                       help="top text transformer layers to train (0 = projection only)")
    train.add_argument("--unlocked-image-stages", type=int, default=0,
                       help="top image trunk stages to train, on cached features below them")
    train.add_argument("--unlock-image", action="store_true",
                       help="train the image trunk too (GPU runs; not cached)")
    train.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    train.add_argument("--workers", type=int, default=None, help="image decoding processes")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--cache-dir", type=Path, default=None,
                       help="keep frozen image features here to reuse across runs")
    train.add_argument("--image-views", type=int, default=1,
                       help="cached views per training image (augmentation): 1 = as "
                            "preprocessed, 2 adds its mirror, more add random crops")
    train.add_argument("--imagenet-weight", type=float, default=0.0,
                       help="weight of the ImageNet pseudo-label term: the image tower's own "
                            "classifier teaches class-name prompts (0 = off)")
    train.add_argument("--imagenet-classes", type=int, default=128,
                       help="class prompts per step in the ImageNet term")
    train.add_argument("--data-note", default="", help="words for the model card's data field")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="Recall@K both ways and zero-shot accuracy")
    _add_manifest(evaluate)
    _add_columns(evaluate)
    _add_model(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--workers", type=int, default=None)
    evaluate.add_argument("--json", type=Path, default=None, help="also write the results here")
    evaluate.set_defaults(func=cmd_eval)

    encode = sub.add_parser("encode", help="encode texts or images to a .npy file")
    _add_model(encode)
    group = encode.add_mutually_exclusive_group(required=True)
    group.add_argument("--texts", nargs="+")
    group.add_argument("--images", nargs="+", type=Path)
    encode.add_argument("--out", type=Path, required=True, help="output .npy (n, d) float32")
    encode.set_defaults(func=cmd_encode)

    demo = sub.add_parser("demo", help="rank the demo corpus for text queries")
    _add_model(demo)
    demo.add_argument("--corpus", type=Path, default=None, help="demo corpus folder")
    demo.add_argument("-k", type=int, default=5)
    demo.add_argument("query", nargs="+")
    demo.set_defaults(func=cmd_demo)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands that other installed packages (indexer, api) register as entry points
    in the "clipdex.commands" group, so the core never imports them."""
    from importlib.metadata import entry_points

    return [entry.load() for entry in entry_points(group="clipdex.commands")]


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "clipdex " + shlex.join(argv)  # recorded in model cards
    try:
        return args.func(args)
    except ClipdexError as error:
        _log(f"clipdex {args.command}: error: {error}")
        return 2
    except KeyboardInterrupt:
        _log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
