"""Artifact formats as backends (ONNX, GGUF, TensorRT): see edgemed.formats.base."""
