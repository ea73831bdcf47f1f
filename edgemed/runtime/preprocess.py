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
    """One image -> pixel_values [N, 3, S, S] float32, as the parent's processor computes it: N = 1,
    or for Idefics3 / SmolVLM image splitting rows x cols tiles and then the whole image."""
    return tiles(image, facts)[0]


def image_grid(image: Any, facts: dict[str, Any] | None) -> tuple[int, int]:
    """(rows, cols) of the tiles the image is cut into; (0, 0) when it is not cut."""
    if not facts or not facts.get("tile_marker"):
        return 0, 0
    w, h = _longest_edge_size(as_image(image).size, facts)
    return _tile_grid(w, h, facts["image_size"])[:2]


def global_image_only(facts: dict[str, Any] | None) -> dict[str, Any] | None:
    """The facts of a model that cuts images into tiles, as one whole image squashed to the tower's
    size (what llama.cpp's mtmd calls the overview; the GGUF session feeds only that)."""
    if not facts or not facts.get("tile_marker"):
        return facts
    return {**facts, "tile_marker": None, "resize_mode": "squash", "longest_edge": None}


def tiles(image: Any, facts: dict[str, Any]) -> tuple[np.ndarray, int, int]:
    """pixel_values [N, 3, S, S] and the (rows, cols) grid they came from (see preprocess)."""
    img = as_image(image)
    if facts.get("resize_mode") == "longest_edge":
        return _idefics3(img, facts)
    return _normalize(_single(img, facts), facts)[None], 0, 0


def _normalize(img: Image.Image, facts: dict[str, Any]) -> np.ndarray:
    x = np.asarray(img, dtype=np.float32) * np.float32(facts["rescale_factor"])
    x = (x - np.asarray(facts["image_mean"], np.float32)) / np.asarray(facts["image_std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _longest_edge_size(size: tuple[int, int], facts: dict[str, Any]) -> tuple[int, int]:
    """Idefics3ImageProcessor's first resize: the longer side to size["longest_edge"], the other
    side kept in proportion and rounded up to even, then everything under 4096 px."""
    w, h = size
    longest = facts["longest_edge"]
    if w >= h:
        w, h = longest, int(longest / (w / h))
        h += h % 2
    else:
        w, h = int(longest * (w / h)), longest
        w += w % 2
    w, h = max(w, 1), max(h, 1)
    cap = 4096  # transformers' MAX_IMAGE_SIZE
    if w >= h and w > cap:
        w, h = cap, int(cap / (w / h))
    elif h > w and h > cap:
        w, h = int(cap * (w / h)), cap
    return max(w, 1), max(h, 1)


def _tile_grid(w: int, h: int, tile: int) -> tuple[int, int, int, int]:
    """The processor's resize_for_vision_encoder (both sides up to multiples of the tile) -> rows,
    cols (0, 0 when one tile holds it) and the resized width and height."""
    import math

    if w >= h:
        w2 = math.ceil(w / tile) * tile
        h2 = math.ceil(int(w2 / (w / h)) / tile) * tile
    else:
        h2 = math.ceil(h / tile) * tile
        w2 = math.ceil(int(h2 * (w / h)) / tile) * tile
    if h2 > tile or w2 > tile:
        return (h2 - tile) // tile + 1, (w2 - tile) // tile + 1, w2, h2
    return 0, 0, w2, h2


def _idefics3(img: Image.Image, facts: dict[str, Any]) -> tuple[np.ndarray, int, int]:
    """Idefics3ImageProcessor (transformers' image_processing_idefics3): every resize a PIL resize of
    the uint8 image, as its PIL backend does; tiles row by row, then the whole image."""
    resample = _RESAMPLE[facts["resample"]]
    tile = facts["image_size"]
    img = img.resize(_longest_edge_size(img.size, facts), resample)
    if not facts.get("tile_marker"):
        return _normalize(img.resize((tile, tile), resample), facts)[None], 0, 0
    rows, cols, w2, h2 = _tile_grid(*img.size, tile)
    img = img.resize((w2, h2), resample)
    parts = [img.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    parts.append(img.resize((tile, tile), resample) if (rows or cols) else img)
    return np.stack([_normalize(p, facts) for p in parts]), rows, cols


def _single(img: Image.Image, facts: dict[str, Any]) -> Image.Image:
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
    return img


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
