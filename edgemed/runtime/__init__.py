"""Run an artifact without torch: `edgemed.runtime.load(dir).generate(image, prompt)`.

Importing this package must never import torch or transformers (checked by a test), so the
runtime extra is all an on-device install needs. Each format backend (edgemed.formats) owns its
session; `open_session` asks the backend the manifest names.
"""
from __future__ import annotations

from pathlib import Path

from edgemed.artifact import Manifest, read_manifest
from edgemed.errors import BadInputError


def load(artifact_dir: str | Path, **kwargs):
    """A session for the artifact's format, with `generate(image, prompt, max_new_tokens)`."""
    path = Path(artifact_dir)
    return open_session(path, read_manifest(path), **kwargs)


def open_session(path: Path, manifest: Manifest, **kwargs):
    """The session of the backend manifest.format names. Every session offers the same calls:
    generate(), prompt_ids(), pixel_values(), encode_image() and logits() (used by parity and bench)."""
    from edgemed.formats.base import FORMATS

    fmt = manifest.format
    if fmt not in FORMATS:
        raise BadInputError(str(path), f"artifact format '{fmt}' has no runtime in this edgemed version",
                            "re-export with an ONNX recipe (int8, int4, fp16) or a GGUF recipe (q8_0, q4_k_m, ...)")
    return FORMATS.get(fmt).open_session(path, manifest, **kwargs)


__all__ = ["load", "open_session"]
