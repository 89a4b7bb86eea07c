"""The ONNX Runtime backend: clipdex exports a loaded model's image and text towers to ONNX
itself, from the very weights it loaded, caches the files, and encodes with ONNX Runtime on CPU.

Why: PyTorch eager runs the default model's depthwise convolutions at a small fraction of a
CPU's matmul peak; ONNX Runtime's fused kernels and graph optimisations run the same graph
about twice as fast (bench/onnx_speed.py), with the same embeddings (tests/retrieval/models/test_onnx.py).

Where the exports live, one folder per model fingerprint and export format (`KEY`):
  - beside a checkpoint, `x.safetensors` -> `x.onnx/KEY/`, when that folder is writable; a new
    export there removes the keys of earlier weights (the checkpoint changed);
  - else (a bundled model installed read-only, an architecture, an open_clip model) in the
    user's cache, `$XDG_CACHE_HOME/clipdex/onnx/KEY/` (default `~/.cache`);
  - or under the folder the caller names (`load_model(..., onnx_cache=...)`).
A folder holds image.onnx, text.onnx and export.json. It is written under a temporary name and
renamed into place, so a killed export never leaves a half-written folder under its key.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.atomic import fsync_path
from retrieval.errors import ModelLoadError
from retrieval.models.choices import BACKENDS
from retrieval.models.clip import ClipModel
from retrieval.models.text import text_features, text_trims, trim_padding

EXPORT_FORMAT = "clipdex-onnx/2"  # bump when the exported graphs change: old keys re-export
FORMAT_TAG = "v2"
OPSET = 17
IMAGE_FILE, TEXT_FILE, INFO_FILE = "image.onnx", "text.onnx", "export.json"
TEMP_PREFIX = ".tmp-"

log = logging.getLogger(__name__)


@dataclass
class OnnxTowers:
    """ONNX Runtime sessions of one model's towers; each maps a batch to (n, d) raw features
    (the batch functions in retrieval/models/inference.py normalise them, as they do torch's)."""

    image_session: Any  # onnxruntime.InferenceSession: (n, 3, H, W) float32 pixels
    text_session: Any  # onnxruntime.InferenceSession: (n, L) int64 token ids
    folder: Path  # where the exported files are
    exported: bool  # True when this load exported them; False when it reused the cache
    # True: the text graph takes any length (a trimmed batch); False: the full context only
    dynamic_length: bool = True

    def image(self, pixels: torch.Tensor) -> np.ndarray:  # (n, 3, H, W) -> (n, d)
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return self.image_session.run(None, {"pixels": array})[0]

    def text(self, tokens: torch.Tensor) -> np.ndarray:  # (n, L) -> (n, d)
        array = tokens.detach().to("cpu", torch.int64).contiguous().numpy()
        return self.text_session.run(None, {"tokens": array})[0]

    def __reduce__(self) -> tuple[Any, tuple[Path, bool, bool]]:
        """Sessions cannot be pickled; a copy sent to another process (a worker, an actor)
        opens its own from the same files, with that process's session options."""
        return _reopen, (self.folder, self.exported, self.dynamic_length)


def _reopen(folder: Path, exported: bool, dynamic_length: bool) -> OnnxTowers:
    return OnnxTowers(_session(folder / IMAGE_FILE), _session(folder / TEXT_FILE), folder,
                      exported, dynamic_length)


def available() -> bool:
    """Whether ONNX Runtime and the exporter's `onnx` package are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def choose(backend: str, device: torch.device) -> str:
    """"torch" or "onnx" for a backend request on `device` ("auto": ONNX Runtime on CPU when
    installed, torch elsewhere: the exported graphs run on ONNX Runtime's CPU provider)."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "onnx" if device.type == "cpu" and available() else "torch"
    if backend == "onnx" and device.type != "cpu":
        raise ModelLoadError(f"the onnx backend runs on CPU, not {device}; pass --device cpu "
                             "or --backend torch")
    if backend == "onnx" and not available():
        raise ModelLoadError("the onnx backend needs onnxruntime and onnx; run `pip install -e .`")
    return backend


def attach(clip: ClipModel, backend: str, cache: Path | None = None) -> None:
    """Give `clip` ONNX Runtime towers when `backend` resolves to "onnx". Under "auto" a model
    that cannot be exported stays on torch (logged); asked for by name, that is an error."""
    if choose(backend, clip.device) != "onnx":
        return
    try:
        clip.onnx = load_towers(clip, cache)
    except ModelLoadError as error:
        if backend == "onnx":
            raise
        log.warning("encoding with torch: %s", error)
        return
    clip.backend = "onnx"


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def session_options() -> Any:
    """One intra-op thread per usable core, no inter-op parallelism (a tower is one chain of
    operators), every graph optimisation (fusions, constant folding, layout changes).

    Idle threads sleep instead of spinning: the cores are shared with the indexer's decode
    workers and the service's request threads, which a spinning pool would starve between
    model calls."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_towers(clip: ClipModel, cache: Path | None = None) -> OnnxTowers:
    """Sessions of `clip`'s exported towers, exporting them first unless the cache holds an
    export of these exact weights."""
    from retrieval.models.identity import model_fingerprint

    fingerprint = model_fingerprint(clip)
    folder = export_folder(clip, fingerprint, cache)
    exported = not is_exported(folder, fingerprint)
    if exported:
        export_towers(clip, folder, fingerprint)
    info = json.loads((folder / INFO_FILE).read_text())
    return OnnxTowers(_session(folder / IMAGE_FILE), _session(folder / TEXT_FILE), folder,
                      exported, bool(info["dynamic_text_length"]))


def _session(path: Path) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=session_options(),
                                    providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for unreadable files
        raise ModelLoadError(f"ONNX Runtime cannot load {path}: {error}; delete its folder "
                             "to export again") from error


def export_folder(clip: ClipModel, fingerprint: str, cache: Path | None = None) -> Path:
    """Where the export of the model with this fingerprint lives (see the module docstring)."""
    key = f"{fingerprint[:24]}-{FORMAT_TAG}"
    if cache is not None:
        return Path(cache) / key
    if clip.source is not None:
        beside = clip.source.parent / f"{clip.source.stem}.onnx"
        if _writable(beside if beside.exists() else clip.source.parent):
            return beside / key
    return user_cache() / key


def user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipdex" / "onnx"


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def is_exported(folder: Path, fingerprint: str) -> bool:
    """A complete export of these weights in this format (folders appear whole, by rename)."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (info.get("format") == EXPORT_FORMAT and info.get("fingerprint") == fingerprint
            and (folder / IMAGE_FILE).is_file() and (folder / TEXT_FILE).is_file())


def export_towers(clip: ClipModel, folder: Path, fingerprint: str) -> None:
    """Export both towers into `folder`, atomically: written in a temporary folder beside it,
    then renamed. A concurrent export of the same weights that wins the rename is kept."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temp = folder.parent / f"{TEMP_PREFIX}{folder.name}-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
    except OSError as error:
        raise ModelLoadError(f"cannot write the ONNX export in {folder.parent}: {error}") from error
    try:
        info = _export_into(clip, temp, fingerprint)
        (temp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for path in (*temp.iterdir(), temp):
            fsync_path(path)
        os.replace(temp, folder)
        fsync_path(folder.parent)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        if not is_exported(folder, fingerprint):
            raise ModelLoadError(f"cannot write the ONNX export {folder}: {error}") from error
        return  # another process exported the same weights first
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if clip.source is not None and folder.parent.name == f"{clip.source.stem}.onnx":
        _prune(folder)


def _prune(folder: Path) -> None:
    """Remove a checkpoint's exports of other weights, and temporary folders whose exporting
    process is gone (a killed export)."""
    for entry in folder.parent.iterdir():
        if entry == folder or not entry.is_dir():
            continue
        if entry.name.startswith(TEMP_PREFIX) and _alive(entry.name.rpartition("-")[2]):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class _ImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, H, W) -> (n, d)
        return self.model.encode_image(pixels)


class _TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (n, L) -> (n, d)
        return text_features(self.model, tokens)


class _TraceableAttention(torch.nn.Module):
    """torch's MultiheadAttention (no dropout, no bias_k/v, float or no mask) written so that
    its trace keeps the sequence length dynamic: torch's own reshapes by a length the
    TorchScript tracer records as a constant. Same weights, same arithmetic."""

    def __init__(self, attention: torch.nn.MultiheadAttention):
        super().__init__()
        self.heads, self.batch_first = attention.num_heads, attention.batch_first
        self.in_proj_weight, self.in_proj_bias = attention.in_proj_weight, attention.in_proj_bias
        self.out_proj = attention.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None,
                **_: Any) -> tuple[torch.Tensor, None]:
        if not self.batch_first:  # (L, n, E) -> (n, L, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = (torch.nn.functional.linear(x, w, b).unflatten(-1, (self.heads, -1))
                   .transpose(1, 2) for x, w, b in zip((query, key, value), weights, biases))
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (n, heads, L, S)
        if attn_mask is not None:
            scores = scores + attn_mask
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)  # (n, L, E)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _traceable(model: torch.nn.Module) -> torch.nn.Module:
    """Swap each plain self-attention module for `_TraceableAttention`, in place."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if (isinstance(child, torch.nn.MultiheadAttention) and child._qkv_same_embed_dim
                    and child.bias_k is None and not child.add_zero_attn):
                setattr(parent, name, _TraceableAttention(child))
    return model


def _export_into(clip: ClipModel, folder: Path, fingerprint: str) -> dict[str, Any]:
    """Trace both towers of a copy of the model into `folder`; returns what export.json says.

    A copy, because the TorchScript exporter changes the module it traces (the model would
    encode differently afterwards), and because attention modules are swapped for traceable
    ones. Traced with autograd on, so that no fused inference path (no ONNX form) is taken."""
    model = _traceable(copy.deepcopy(clip.model).to("cpu").eval())
    pixels = clip.preprocess(Image.new("RGB", (64, 64), (127, 127, 127)))[None]  # (1, 3, H, W)
    pixels = pixels.repeat(2, 1, 1, 1)
    # Two captions of different lengths, so that the traced graph handles padding.
    tokens = clip.tokenizer(["a photo of a dog running on the grass", "a cat"])
    dynamic_length = dynamic_text_length(model)
    if dynamic_length:
        tokens = trim_padding(tokens, clip.pad_token_id)
    text_axes = {0: "batch", 1: "length"} if dynamic_length else {0: "batch"}
    _export(_ImageTower(model), pixels, folder / IMAGE_FILE, "pixels", {0: "batch"})
    _export(_TextTower(model), tokens, folder / TEXT_FILE, "tokens", text_axes)
    return {"format": EXPORT_FORMAT, "fingerprint": fingerprint, "arch": clip.arch,
            "opset": OPSET, "torch": torch.__version__, "image_input": list(pixels.shape[1:]),
            "dynamic_text_length": dynamic_length}


def dynamic_text_length(model: torch.nn.Module) -> bool:
    """Whether the exported text graph can take a batch at its real length (else it is
    exported at the full context, and ONNX batches are padded to it)."""
    return text_trims(model)


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str,
            axes: dict[int, str]) -> None:
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is the legacy one and that traced shapes may
        # be constants; the equality tests check the graphs at other batch sizes and lengths.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[input_name], output_names=["features"],
                              dynamic_axes={input_name: axes, "features": {0: "batch"}})
        except Exception as error:  # the exporter raises many types for unsupported models
            raise ModelLoadError(f"cannot export {path.stem} tower to ONNX: {error}") from error
