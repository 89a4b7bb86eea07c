"""Turning pixels and tokens into (n, d) unit vectors: loading a dual encoder (`loading`),
its card and checkpoints (`card`), its identity in an index (`identity`), the torch and ONNX
Runtime backends (`inference`, `onnx`) and the file-decoding pipeline (`files`).
`configs/` holds clipdex's architectures and `bundled/` the shipped weights."""
