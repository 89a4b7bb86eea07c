"""Flags come from the configuration dataclasses: every field has one, and the parsed
arguments build the same config back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from clipdex.commands.models import TRAIN_SET_ELSEWHERE
from clipdex.main import build_parser
from clipdex.options import config_from
from indexer.build import BuildConfig
from retrieval.training.config import TrainConfig


def _dests(*argv: str) -> dict:
    return vars(build_parser().parse_args(list(argv)))


def test_every_train_config_field_is_a_flag_and_round_trips(tmp_path):
    args = build_parser().parse_args([
        "train", "--manifest", "m.csv", "--out", str(tmp_path), "--epochs", "3", "--lr", "0.01",
        "--warmup", "0.2", "--unlock-image", "--cache-dir", str(tmp_path / "c"), "--resume"])
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    assert names - TRAIN_SET_ELSEWHERE <= set(vars(args))
    config = config_from(args, TrainConfig, command="clipdex train …")
    assert config == TrainConfig(out=tmp_path, epochs=3, lr=0.01, warmup_fraction=0.2,
                                 lock_image=False, cache_dir=tmp_path / "c", resume=True,
                                 command="clipdex train …")


def test_defaults_are_the_config_defaults(tmp_path):
    args = build_parser().parse_args(["train", "--manifest", "m.csv", "--out", str(tmp_path)])
    assert config_from(args, TrainConfig, command="") == TrainConfig(out=tmp_path)
    build = build_parser().parse_args(["index", "build", "photos", "--out", "idx"])
    assert config_from(build, BuildConfig) == BuildConfig()


def test_index_flags_keep_their_names():
    args = build_parser().parse_args(["index", "add", "new", "--index", "idx",
                                      "--index-type", "hnsw", "--max-memory", "2GB",
                                      "--shard-size", "16", "--workers", "0"])
    config = config_from(args, BuildConfig)
    assert (config.index_kind, config.max_memory, config.shard_size, config.workers) == (
        "hnsw", "2GB", 16, 0)
    assert args.index == Path("idx") and args.model == "default"


def test_model_device_and_precision_are_one_definition():
    for argv in (["eval", "--manifest", "m.csv"], ["encode", "--texts", "a", "--out", "e.npy"],
                 ["demo", "a cat"], ["serve", "--index", "idx"],
                 ["index", "build", "p", "--out", "o"]):
        parsed = _dests(*argv, "--model", "clipdex-tiny", "--device", "cpu")
        assert (parsed["model"], parsed["device"]) == ("clipdex-tiny", "cpu"), argv
