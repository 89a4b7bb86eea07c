"""`clipdex index build|add|delete|compact|info`: the indexing jobs (indexer.build, and
indexer.external_embeddings for `build --from-embeddings`) with progress bars and summaries; the jobs
and the store never print."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipdex.options import (
    MODEL_HELP,
    Flag,
    config_flags,
    config_from,
    log,
    model_options,
    tqdm_progress,
)
from retrieval.ann.engines import KINDS
from retrieval.errors import EngineError, ManifestError, ModelLoadError
from retrieval.models.choices import PRECISIONS

BUILD_FLAGS = {
    "batch_size": Flag("images per model call"),
    "workers": Flag("image decoding processes"),
    "max_pixels": Flag("skip images larger than this many pixels"),
    "shard_size": Flag("items per resumable shard (smaller: less lost to a kill)"),
    "max_memory": Flag("index memory budget, e.g. 4GB"),
    "index_kind": Flag("force an index type instead of choosing by size and memory",
                       name="--index-type", choices=KINDS),
    "precision": Flag("autocast precision", choices=PRECISIONS),
    "target_recall": Flag("recall@10 against exact search that an approximate index's search "
                          "settings are tuned to reach; lower answers faster (default: 0.95, "
                          "or for `add` the index's own)"),
}
RAY_FLAGS = {
    "ray_address": Flag("with --engine ray: join this cluster ('auto', or ray://HOST:PORT) "
                        "instead of starting Ray on this machine"),
    "num_encoders": Flag("with --engine ray: encoder actors, each with its own model copy"),
    "gpus_per_encoder": Flag("with --engine ray: GPUs each encoder reserves; unset: 1 when "
                             "the cluster has GPUs, else 0"),
    "cpus_per_encoder": Flag("with --engine ray: CPUs each encoder reserves"),
}
BUILD_MODEL_HELP = (MODEL_HELP.replace(" (default: %(default)s)", "") +
                    "; with --from-embeddings, the model that made them (its dimension is "
                    "checked) or external:NAME for one clipdex cannot load (then only vector and "
                    "item queries work). Default: 'default' when encoding; required with "
                    "--from-embeddings")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `index` and its actions to the `clipdex` parser."""
    from indexer.config import BuildConfig, RayConfig

    index = subparsers.add_parser("index", help="build and update image/text search indexes")
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build_parser = actions.add_parser("build", help="encode sources into a new index generation")
    build_parser.add_argument("sources", nargs="*", type=Path,
                              help="image folders, CSV/JSONL/parquet manifests, .txt corpora")
    build_parser.add_argument("--out", type=Path, required=True, help="index directory")
    build_parser.add_argument("--from-embeddings", type=Path, default=None, metavar="DIR",
                              help="build from precomputed embeddings instead of sources: "
                                   "clip-retrieval's inference output (img_emb/, text_emb/, "
                                   "metadata/); nothing is encoded")
    build_parser.add_argument("--media-root", type=Path, action="append", default=[],
                              metavar="DIR", dest="media_roots",
                              help="with --from-embeddings: a folder whose image files the "
                                   "service may serve (repeatable); image paths outside "
                                   "every --media-root are kept as metadata, never opened")
    model_options(build_parser, model_default=None, model_help=BUILD_MODEL_HELP)
    config_flags(build_parser, BuildConfig, BUILD_FLAGS)
    build_parser.add_argument("--engine", choices=("local", "ray"), default="local",
                              help="encode in this process, or on Ray Data (this machine, or "
                                   "a cluster with --ray-address); an on-disk index's lists "
                                   "are then filled in Ray tasks too (default: %(default)s)")
    config_flags(build_parser, RayConfig, RAY_FLAGS)
    build_parser.set_defaults(func=cmd_build)

    add_parser = actions.add_parser("add", help="add new sources into a new generation")
    add_parser.add_argument("sources", nargs="+", type=Path)
    add_parser.add_argument("--index", type=Path, required=True, help="index directory")
    model_options(add_parser)
    config_flags(add_parser, BuildConfig, BUILD_FLAGS)
    add_parser.set_defaults(func=cmd_add)

    delete_parser = actions.add_parser("delete", help="delete items by id or image path")
    delete_parser.add_argument("--index", type=Path, required=True)
    group = delete_parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--id", type=int, nargs="+", dest="ids")
    group.add_argument("--path", type=Path, nargs="+", dest="paths")
    delete_parser.add_argument("--max-memory", default="4GB")
    delete_parser.set_defaults(func=cmd_delete)

    compact_parser = actions.add_parser("compact", help="rewrite the index without deleted items")
    compact_parser.add_argument("--index", type=Path, required=True)
    compact_parser.add_argument("--max-memory", default="4GB")
    compact_parser.set_defaults(func=cmd_compact)

    _register_inspection(actions)


def _register_inspection(actions: argparse._SubParsersAction) -> None:
    from clipdex.commands import dedup, sync

    dedup.add_parser(actions)
    sync.add_parser(actions)
    info_parser = actions.add_parser("info", help="print the current generation's manifest")
    info_parser.add_argument("index", type=Path)
    info_parser.set_defaults(func=cmd_info)

    verify_parser = actions.add_parser(
        "verify", help="re-read every file of the current generation against its SHA-256 "
                       "(opening one checks sizes, and hashes only files up to 256 MiB)")
    verify_parser.add_argument("index", type=Path)
    verify_parser.add_argument("--generation", default=None, help="another generation's name")
    verify_parser.set_defaults(func=cmd_verify)


def _config(args: argparse.Namespace):
    """The job's configuration; a budget or a recall target that cannot be used is refused
    before anything is read or encoded."""
    from indexer.config import BuildConfig
    from retrieval.ann.engines import parse_memory
    from retrieval.errors import IndexStoreError

    try:
        parse_memory(args.max_memory)  # fail early on "4 gallons"
    except ValueError as error:
        raise IndexStoreError(f"--max-memory: {error}") from None
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        raise IndexStoreError(f"--target-recall must be above 0 and at most 1 (a recall@10), "
                              f"got {args.target_recall}")
    return config_from(args, BuildConfig)


def _load(args: argparse.Namespace, backend: str | None = None):
    """Load the model (random-weight architectures load identically every time, so a
    rerun, resume or `add` matches the index's model fingerprint)."""
    from retrieval.models.loading import load_model

    return load_model(args.model, args.device, backend=backend or args.backend)


def _report(summary) -> None:
    shards = (f"{summary.shards_read} shards of precomputed embeddings, nothing encoded"
              if summary.shards_read else f"shards: {summary.shards_encoded} encoded, "
                                          f"{summary.shards_resumed} resumed")
    log(f"generation {summary.generation}: {summary.images} images, {summary.texts} texts "
         f"in {summary.seconds:.1f} s ({shards})")
    skipped = sum(summary.skipped.values())
    if skipped:
        reasons = ", ".join(f"{kind} {n}" for kind, n in sorted(summary.skipped.items()))
        log(f"skipped {skipped}: {reasons} (see {summary.errors_file})")
    if summary.outside_media_roots:
        log(f"{summary.outside_media_roots} image paths lie outside every --media-root: kept "
            "as metadata (image_path), never opened or served")
    for modality, report in summary.tuning.items():
        if "skipped" in report:
            log(f"{modality} index tuning skipped: {report['skipped']}")
        else:
            log(f"{modality} index: recall@{report['k']} {report['recall_at_' + str(report['k'])]}"
                 f" vs exact with {report['queries']} {report['query_source']} queries, "
                 f"{report['qps']:.0f} queries/s ({report['param']}={report['value']})")
    print(json.dumps(summary.as_dict(), indent=2))


def cmd_build(args: argparse.Namespace) -> int:
    if args.from_embeddings is not None:  # no model code: an import needs none
        return _build_from_embeddings(args)
    from indexer.build import build
    from indexer.config import RayConfig

    if args.media_roots:
        raise ManifestError("--media-root is for --from-embeddings imports; an index built "
                            "from folders and manifests serves the images it read")
    if not args.sources:
        raise ManifestError("give the sources to index, or --from-embeddings DIR")
    args.model = args.model or "default"
    if args.engine == "ray":
        return _build_on_ray(args)
    if config_from(args, RayConfig) != RayConfig():
        raise EngineError("--ray-address, --num-encoders, --gpus-per-encoder and "
                          "--cpus-per-encoder need --engine ray")
    clip = _load(args)
    _report(build(args.sources, args.out, clip, _config(args), progress=tqdm_progress))
    return 0


def _build_on_ray(args: argparse.Namespace) -> int:
    """`index build --engine ray`: this process lists the sources and writes the index; Ray's
    workers decode and encode (each encoder loads the model named by --model itself)."""
    from indexer.ray_build import ModelSpec, RayConfig, build_on_ray

    clip = _load(args)
    model = ModelSpec(args.model, args.device, args.backend)
    _report(build_on_ray(args.sources, args.out, clip, model,
                         _config(args), config_from(args, RayConfig), progress=tqdm_progress))
    return 0


def _build_from_embeddings(args: argparse.Namespace) -> int:
    """`index build --from-embeddings DIR`: the model is named, never guessed: a default
    model of the same dimension would pass the check and answer text queries with noise."""
    from indexer.external_embeddings import build_from_embeddings, parse_model
    from retrieval.models.identity import model_identity

    if args.sources:
        raise ManifestError("give sources or --from-embeddings DIR, not both")
    if args.model is None:
        raise ModelLoadError("--from-embeddings needs --model: the model that made the "
                             "embeddings (e.g. ViT-B-32:openai), or external:NAME to record one "
                             "clipdex cannot load (vector and item queries only)")
    model = parse_model(args.model) or model_identity(_load(args, backend="torch"))
    if args.engine == "ray":  # an on-disk index's lists are filled in Ray tasks
        from indexer.ray_build import RayConfig, import_on_ray

        _report(import_on_ray(args.from_embeddings, args.out, model, _config(args),
                              config_from(args, RayConfig), progress=tqdm_progress,
                              media_roots=args.media_roots))
        return 0
    _report(build_from_embeddings(args.from_embeddings, args.out, model, _config(args),
                                  progress=tqdm_progress, media_roots=args.media_roots))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from indexer.build import add

    clip = _load(args)
    _report(add(args.sources, args.index, clip, _config(args), progress=tqdm_progress))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from indexer.config import BuildConfig
    from retrieval.index import delete_items

    name = delete_items(args.index, ids=args.ids or (), paths=args.paths or (),
                        options=BuildConfig(max_memory=args.max_memory).store_options())
    log(f"generation {name}: deleted {len(args.ids or args.paths)} item(s)")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from indexer.build import compact
    from indexer.config import BuildConfig

    name = compact(args.index, BuildConfig(max_memory=args.max_memory))
    log(f"generation {name}: compacted")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """The manifest as JSON on stdout; a line per modality on stderr naming the index type
    and where its data lives."""
    from retrieval.store import read_generation_manifest

    manifest = read_generation_manifest(args.index)
    for modality, section in manifest.data["modalities"].items():
        spec, sizes = section["index"], manifest.data.get("sizes", {})
        lists = section.get("lists_file")
        where = (f"inverted lists on disk, memory-mapped ({lists}, "
                 f"{sizes.get(lists, 0) / 2**20:,.1f} MiB)" if lists else "held in memory")
        copy = section.get("reduced")
        scan = (f"; filters scan {copy['components']} principal components, re-rank "
                f"{copy['rerank']}" if copy else "")
        log(f"{modality}: {spec['kind']} index ({spec['factory']}), {where}; "
            f"{section['live']} live, {section['deleted']} deleted{scan}")
    print(json.dumps(manifest.data, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from retrieval.store import verify_generation

    checked = verify_generation(args.index, args.generation)
    log(f"generation {checked.name}: all {len(checked.data['files'])} files match their SHA-256")
    return 0
