"""Run an artifact without torch: `edgemed.runtime.load(dir).generate(image, prompt)`.

Importing this package must never import torch or transformers (checked by a test), so the
runtime extra is all an on-device install needs. Each format backend (edgemed.formats) owns its
session; `open_session` asks the backend the manifest names.

An artifact folder is a trust boundary: `load` checks it before any runtime library opens a file
(see check_artifact and the README's "Security" section).
"""
from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from edgemed.artifact import Manifest, read_manifest, verify_or_raise
from edgemed.errors import BadInputError


def load(artifact_dir: str | Path, *, verify: bool = True, allow_rejected: bool = False, device: str = "auto",
         **kwargs):
    """A session for the artifact's format, with `generate(image, prompt, max_new_tokens)`, after
    check_artifact: sha256 of every file unless `verify=False` (sizes are always checked); an artifact
    its gates rejected only with `allow_rejected=True`. `device`: "auto" (the target's accelerator
    when this machine can run it there, else the CPU), "cpu" or "cuda" (refused with exit 2 where
    there is no GPU or no GPU runtime); `session.device` says which ran and why."""
    path = Path(artifact_dir)
    manifest = read_manifest(path)
    check_artifact(path, manifest, hashes=verify, allow_rejected=allow_rejected)
    return open_session(path, manifest, device=device, **kwargs)


def check_artifact(path: Path, manifest: Manifest, *, hashes: bool = True, allow_rejected: bool = False) -> None:
    """Refuse (BadInputError / VerificationError, exit 2) an artifact that is not what its manifest
    says: a status of `rejected` (unless allowed), a path that leaves the folder or crosses a symlink,
    a file missing, changed (size; sha256 with `hashes`) or unlisted, a file the format's session
    needs and the manifest lacks, and the format's own checks (ONNX external data inside the folder)."""
    from edgemed.formats.base import FORMATS

    if manifest.status == "rejected" and not allow_rejected:
        raise BadInputError(str(path), f"its recipe's gates rejected this artifact ({manifest.status_reason})",
                            "compress with another recipe, or pass allow_rejected=True (`--allow-rejected`) "
                            "to run it anyway")
    if manifest.format not in FORMATS:
        raise BadInputError(str(path), f"artifact format '{manifest.format}' has no runtime in this edgemed version",
                            "re-export with an ONNX recipe (int8, int4, fp16) or a GGUF recipe (q8_0, q4_k_m, ...)")
    backend = FORMATS.get(manifest.format)
    verify_or_raise(path, manifest, hashes=hashes)
    missing = [pattern for pattern in backend.required_files(manifest)
               if not any(fnmatch(f.path, pattern) for f in manifest.files)]
    if missing:
        raise BadInputError(str(path), f"a {manifest.format} artifact needs {', '.join(m.lstrip('*') for m in missing)}, "
                            "which it lacks",
                            "re-run `edgemed compress` (the folder is incomplete)")
    backend.check_files(path, manifest)


def open_session(path: Path, manifest: Manifest, device: str | None = None, **kwargs):
    """The session of the backend manifest.format names, without the checks of `load` (for a
    folder edgemed is writing itself). Every session offers the same calls: generate(),
    prompt_ids(), pixel_values(), encode_image() and logits() (used by parity and bench).
    `device` as in `load`; None: the session's own default (the CPU; TensorRT engines where built)."""
    from edgemed.formats.base import FORMATS
    from edgemed.runtime.device import choose_device

    fmt = manifest.format
    if fmt not in FORMATS:
        raise BadInputError(str(path), f"artifact format '{fmt}' has no runtime in this edgemed version",
                            "re-export with an ONNX recipe (int8, int4, fp16) or a GGUF recipe (q8_0, q4_k_m, ...)")
    backend = FORMATS.get(fmt)
    if device is not None:
        runtime_reason = None if device == "cpu" else backend.cuda_unavailable_reason(path, manifest)
        kwargs["device"] = choose_device(device, fmt, manifest.target, runtime_reason)
    return backend.open_session(path, manifest, **kwargs)


__all__ = ["load", "check_artifact", "open_session"]
