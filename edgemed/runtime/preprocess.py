"""Image preprocessing in numpy/Pillow that reproduces the parent's Hugging Face image processor
(resize with the same PIL filter, rescale, normalize), so the runtime needs neither torch nor
transformers. tests/test_preprocess.py checks it against the real processors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgemed.errors import BadInputError

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
MAX_PIXELS = 50_000_000
MIN_SIDE = 8


def as_image(image: Any) -> Image.Image:
    """A PIL image from a PIL image, an HxWxC uint8 array, or a path (DICOM/NIfTI/PNG/JPEG)."""
    if isinstance(image, Image.Image):
        img = image
        what = "image"
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.dtype != np.uint8:
            raise BadInputError("image array", f"expected HxW or HxWx3 uint8, got {image.dtype} {image.shape}",
                                "pass a PIL image or a uint8 array")
        img = Image.fromarray(image)
        what = "image array"
    elif isinstance(image, (str, Path)):
        from edgemed.imaging import load_medical_image

        return load_medical_image(image)
    else:
        raise BadInputError("image", f"unsupported type {type(image).__name__}", "pass a PIL image, array or path")
    w, h = img.size
    if min(w, h) < MIN_SIDE or w * h > MAX_PIXELS:
        raise BadInputError(what, f"size {w}x{h} is outside {MIN_SIDE}px per side .. {MAX_PIXELS // 1_000_000} MP",
                            "pass a real radiograph or photograph")
    return img.convert("RGB")


def preprocess(image: Any, facts: dict[str, Any]) -> np.ndarray:
    """One image -> pixel_values [1, 3, S, S] float32, as the parent's processor computes it."""
    img = as_image(image)
    if facts.get("pad_to_square"):
        img = pad_to_square(img, tuple(int(m * 255) for m in facts["image_mean"]))
    resample = _RESAMPLE[facts["resample"]]
    size = facts["image_size"]
    if facts["resize_mode"] == "shortest_edge_center_crop":
        short = facts.get("shortest_edge") or size
        w, h = img.size
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
        img = img.resize((new_w, new_h), resample)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), resample)
    x = np.asarray(img, dtype=np.float32) * np.float32(facts["rescale_factor"])
    x = (x - np.asarray(facts["image_mean"], np.float32)) / np.asarray(facts["image_std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def pad_to_square(img: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Centre the image on a square of its longer side filled with the mean colour: LLaVA's
    expand2square (LLaVA-Med's image_aspect_ratio "pad"), which LlavaImageProcessor's do_pad reproduces."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out
