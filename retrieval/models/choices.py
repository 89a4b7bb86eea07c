"""The names a caller may pick: what a dual encoder embeds (its modalities), and how a model
runs (its backend and its autocast precision).

A leaf with nothing but constants, so the command line can offer them as choices without
importing torch (retrieval/models/__init__.py imports nothing either).
"""

from __future__ import annotations

# The two towers' inputs: every index holds one vector space per modality, every query
# targets one of them.
MODALITIES = ("image", "text")
# What runs the towers: torch, ONNX Runtime (retrieval/models/onnx.py), or auto: ONNX Runtime
# on CPU when installed, torch elsewhere.
BACKENDS = ("auto", "torch", "onnx")
# Autocast precision (retrieval/models/inference.py): auto is fp16 on CUDA, fp32 on CPU.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
