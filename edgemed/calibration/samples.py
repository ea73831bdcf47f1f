"""A calibration set as (prompt, answer, image) samples: from a folder of medical images with an
optional prompts.jsonl, a set by name (`edgemed calib build`), or edgemed's built-in material."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgemed.calibration.builtin import BUILTIN_TURNS, synthetic_test_image
from edgemed.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.models import CompositeModel

Modality = Literal["multimodal", "text"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz", ".bmp", ".tif", ".tiff")

@dataclass
class Calibration:
    """What the imatrix was computed from (written into the manifest notes and imatrix.datasets)."""

    source: str
    modality: Modality
    samples: list[tuple[str, str, Any]] = field(default_factory=list)  # (prompt, answer, image or None)

    def record(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for prompt, answer, image in self.samples:
            h.update(prompt.encode())
            h.update(answer.encode())
            if image is not None:
                h.update(np.asarray(image).tobytes())
        return {"source": self.source, "count": len(self.samples), "modalities": self.modality,
                "sha256": h.hexdigest()}


def calibration_set(cm: "CompositeModel", source: str | None, modality: Modality, count: int) -> Calibration:
    """`source`: a folder of medical images (DICOM/NIfTI/PNG/JPEG) with an optional prompts.jsonl
    ({"prompt": ..., "answer": ...} per line), a calibration set by name (`edgemed calib build`,
    `synthetic-cxr`), or None for edgemed's built-in synthetic radiographs."""
    turns = list(BUILTIN_TURNS)
    images: list[Any] = []
    if source and not Path(source).is_dir():
        from edgemed.calibration.sets import resolve_calibration_set

        source = str(resolve_calibration_set(source))
    if source:
        root = Path(source)
        if not root.is_dir():
            raise BadInputError(f"calibration '{source}'", "no such folder",
                                "give a folder of images (and optional prompts.jsonl), or leave calibration unset")
        pj = root / "prompts.jsonl"
        if pj.is_file():
            turns = [(d["prompt"], d.get("answer", "")) for d in map(json.loads, pj.read_text().splitlines()) if d]
        if modality == "multimodal":
            from edgemed.imaging import load_medical_image

            files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
            if not files:
                raise BadInputError(f"calibration '{source}'", "holds no images", "add DICOM/NIfTI/PNG/JPEG files")
            images = [load_medical_image(p) for p in files[:count]]
    name = source or "edgemed-builtin-synthetic-radiographs"
    with_images = modality == "multimodal" and cm.multimodal
    if with_images and not images:
        side = max(cm.image.image_size, 64)
        images = [synthetic_test_image(size=side, seed=100 + i) for i in range(count)]
    samples = []
    for i in range(count):
        prompt, answer = turns[i % len(turns)]
        samples.append((prompt, answer, images[i % len(images)] if with_images else None))
    return Calibration(source=name, modality=modality if with_images else "text", samples=samples)


