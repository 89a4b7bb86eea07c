"""The text tower at a batch's real length: trimming right-padding and running open_clip's
causal tower on the trimmed batch. A leaf module, so the torch inference functions and the
ONNX export (which traces `text_features`) share it without importing each other.
"""

from __future__ import annotations

import open_clip
import torch


def trim_padding(tokens: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Cut a right-padded (n, context_length) batch to its longest real sequence.

    Both open_clip text towers give the same result on the trimmed batch: the HF tower masks
    padding, and the causal CLIP tower pools at the end token, which never sees later pads.
    """
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    length = int(((tokens != pad_token_id) * positions).max().clamp_min(1))
    return tokens[:, :length]


def text_trims(model: torch.nn.Module) -> bool:
    """True when the text tower gives the same features on a batch trimmed of its padding:
    open_clip's HF tower (it masks padding) and causal towers pooled at the end token."""
    return hasattr(model, "text") or getattr(model, "text_pool_type", "argmax") in ("argmax", "eos")


def text_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(n, L) token ids at the length given -> (n, d) features. A trimmed batch suits towers
    for which `text_trims` holds; others need the full context. The ONNX text tower is an
    export of this function, so that its sequence axis can be dynamic."""
    if hasattr(model, "text") or not text_trims(model):  # the HF tower masks padding itself
        return model.encode_text(tokens)
    return _encode_causal_text(model, tokens)


def _encode_causal_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text at the batch's real length (its own assumes full length).

    Slicing the positional embedding and causal mask is exact for end-token pooling; other
    pool types depend on the padded length, so those models are encoded padded (`text_trims`).
    """
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # (n, L, width)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(
        x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection if model.text_projection is not None else x
