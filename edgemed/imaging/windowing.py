"""Stored pixel values -> 8-bit display values: CT window presets, windowing and min-max scaling."""

from __future__ import annotations

import numpy as np
from PIL import Image

from edgemed.errors import BadInputError

__all__ = [
    "WINDOW_PRESETS",
    "Window",
    "minmax_unit",
    "resolve_window",
    "rgb_image",
    "to_uint8",
    "window_unit",
]

Window = str | tuple[float, float] | None

#: CT display windows as (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 400.0),
}


def resolve_window(window: Window) -> tuple[float, float] | None:
    """A preset name or a `(center, width)` pair -> `(center, width)`; None stays None."""
    if window is None:
        return None
    presets = ", ".join(WINDOW_PRESETS)
    fix = f"use one of {presets}, or a (center, width) pair such as (40, 400)"
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_").replace(" ", "_")
        if key not in WINDOW_PRESETS:
            raise BadInputError(f"window={window!r}", "unknown window preset", fix)
        return WINDOW_PRESETS[key]
    try:
        center, width = (float(v) for v in window)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise BadInputError(
            f"window={window!r}", "not a preset name or a (center, width) pair", fix
        ) from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise BadInputError(f"window={window!r}", "the width must be a positive finite number", fix)
    return center, width


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (NaN allowed) -> uint8."""
    unit = np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def window_unit(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    # LINEAR_EXACT (PS3.3 C.11.2.1.3.2): center and width taken literally, as presets are quoted.
    return np.clip((arr.astype(np.float64) - center) / width + 0.5, 0.0, 1.0)


def minmax_unit(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros_like(arr)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:  # a constant image: show it black rather than divide by zero
        return np.zeros_like(arr)
    return (arr - lo) / (hi - lo)


def rgb_image(gray_or_rgb: np.ndarray) -> Image.Image:
    if gray_or_rgb.ndim == 2:
        gray_or_rgb = np.repeat(gray_or_rgb[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(gray_or_rgb, dtype=np.uint8)).convert("RGB")
