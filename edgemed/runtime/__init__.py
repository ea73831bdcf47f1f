"""Run an artifact without torch: `edgemed.runtime.load(dir).generate(image, prompt)`.

Importing this package must never import torch or transformers (checked by a test), so the
runtime extra is all an on-device install needs.
"""
from __future__ import annotations

from pathlib import Path

from edgemed.artifact import read_manifest
from edgemed.errors import BadInputError


def load(artifact_dir: str | Path, **kwargs):
    """A session for the artifact's format, with `generate(image, prompt, max_new_tokens)`."""
    path = Path(artifact_dir)
    return open_session(path, read_manifest(path), **kwargs)


def open_session(path: Path, manifest: dict, **kwargs):
    """Dispatch on manifest['format']. Every session offers the same calls: generate(),
    prompt_ids(), pixel_values(), encode_image() and logits() (used by parity and bench)."""
    fmt = manifest.get("format")
    if fmt == "onnx":
        from edgemed.runtime.onnx_session import OnnxSession

        return OnnxSession(path, manifest, **kwargs)
    if fmt == "gguf":
        from edgemed.runtime.gguf_session import GgufSession

        return GgufSession(path, manifest, **kwargs)
    if fmt == "tensorrt":
        # TensorRT engines where `edgemed build-engine` built them and tensorrt imports; otherwise
        # the same Q/DQ ONNX graphs on ONNX Runtime (host parity, a machine without TensorRT).
        from edgemed.runtime.trt_session import open_tensorrt

        return open_tensorrt(path, manifest, **kwargs)
    raise BadInputError(str(path), f"artifact format '{fmt}' has no runtime in this edgemed version",
                        "re-export with an ONNX recipe (int8, int4, fp16) or a GGUF recipe (q8_0, q4_k_m, ...)")


__all__ = ["load", "open_session"]
