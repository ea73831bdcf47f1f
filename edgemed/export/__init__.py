"""Exporters: PyTorch composite model -> target format files (onnx, gguf, tensorrt)."""
