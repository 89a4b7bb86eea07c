"""Flags shared by several subcommands, and flags generated from configuration dataclasses.

`--model`, `--device`, `--backend` and `--precision` are defined once here. A frozen config dataclass
(TrainConfig, BuildConfig) gives its flags' names, types and defaults; `config_flags` adds
them to a parser and `config_from` builds the config back from the parsed arguments, so no
field is copied by hand and a new field cannot be forgotten (tests check every field has a
flag or is named as set elsewhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retrieval.models.choices import BACKENDS, PRECISIONS

MODEL_HELP = ("'default' (bundled), a .safetensors checkpoint, a clipdex architecture, an "
              "open_clip ARCH[:TAG], an hf-hub:ORG/NAME spec, or a local open_clip model folder "
              "(default: %(default)s)")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tqdm_progress(label: str, total: int) -> Any:
    """The bars the command line draws for the core's long jobs (see retrieval.progress)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="item", dynamic_ncols=True, file=sys.stderr,
                disable=total == 0, leave=False)


def model_options(parser: argparse.ArgumentParser, precision: bool = False,
                  model_default: str | None = "default", model_help: str = MODEL_HELP,
                  backend: bool = True, device_default: str = "auto",
                  backend_default: str = "auto", env_prefix: str | None = None) -> None:
    """--model and --device; --backend for commands that only encode (training needs torch).

    With `env_prefix` (`clipdex serve`, whose settings read the environment) a flag not given
    is left out of the parsed arguments, so the environment (`{env_prefix}MODEL`, ...) comes
    before the defaults, which the help still shows."""
    def unset_or(default: Any) -> Any:
        return default if env_prefix is None else argparse.SUPPRESS

    parser.add_argument("--model", default=unset_or(model_default),
                        help=_shown(model_help, model_default, "model", env_prefix))
    parser.add_argument("--device", default=unset_or(device_default),
                        help=_shown("auto, cpu, cuda, cuda:1 … (default: %(default)s)",
                                    device_default, "device", env_prefix))
    if backend:
        parser.add_argument("--backend", default=unset_or(backend_default), choices=BACKENDS,
                            help=_shown("what runs the towers: onnx (ONNX Runtime, CPU; "
                                        "exported on first use and cached beside the model), "
                                        "torch, or auto: onnx on CPU when installed, torch on "
                                        "CUDA (default: %(default)s)",
                                        backend_default, "backend", env_prefix))
    if precision:
        parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                            help="autocast precision (auto: fp16 on CUDA, fp32 on CPU)")


def _shown(text: str, default: Any, name: str, env_prefix: str | None) -> str:
    """`text` with its "(default: %(default)s)" spelt out, and the environment variable named
    when there is one (argparse cannot show a default it does not hold)."""
    if env_prefix is None:
        return text
    shown = f"{default}, or env {env_prefix}{name.upper()}".replace("%", "%%")
    return text.replace("%(default)s", shown)


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line (all optional)."""

    help: str = ""
    name: str | None = None  # the flag, when not --field-name
    choices: tuple[str, ...] | None = None
    invert: str | None = None  # a bool field set False by this store_true flag


def config_flags(parser: argparse.ArgumentParser, config: type, flags: Mapping[str, Flag],
                 skip: frozenset[str] = frozenset()) -> None:
    """Add one flag per field of the dataclass `config` (except `skip`), typed and defaulted
    from the field itself."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        if field.name in skip:
            continue
        flag = flags.get(field.name, Flag())
        default = _default(field)
        kind = _plain_type(hints[field.name])
        if flag.invert:
            parser.add_argument(flag.invert, dest=field.name, action="store_false",
                                default=default, help=flag.help)
        elif kind is bool:
            parser.add_argument(_flag_name(field.name, flag), dest=field.name,
                                action="store_true", default=default, help=flag.help)
        else:
            required = default is dataclasses.MISSING
            parser.add_argument(_flag_name(field.name, flag), dest=field.name, type=kind,
                                default=None if required else default, required=required,
                                choices=flag.choices, help=_help(flag.help, required))


def config_from(args: argparse.Namespace, config: type, **given: Any) -> Any:
    """The config dataclass from parsed arguments; `given` fills the fields with no flag."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(config)
              if field.name not in given and hasattr(args, field.name)}
    return config(**values, **given)


def _flag_name(name: str, flag: Flag) -> str:
    return flag.name or "--" + name.replace("_", "-")


def _help(text: str, required: bool) -> str:
    return text if required else (f"{text} (default: %(default)s)" if text
                                  else "(default: %(default)s)")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _plain_type(hint: Any) -> Any:
    """int | None -> int; Path -> Path; the parser's `type` for a field."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = options[0] if len(options) == 1 else str
    return hint if hint in (int, float, str, bool, Path) else str
