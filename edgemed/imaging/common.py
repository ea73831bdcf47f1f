"""Checks every image format shares: the path, an index argument, the pixel size limits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgemed.errors import BadInputError

__all__ = ["MAX_FRAME_PIXELS", "MIN_SIDE_PX", "PathLike", "check_index", "check_size", "existing_file"]

PathLike = str | os.PathLike[str]

MIN_SIDE_PX = 8
MAX_FRAME_PIXELS = 50_000_000


def check_index(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise BadInputError(
            f"{name}={value!r}", "must be a non-negative integer index", f"pass {name}=0, 1, ..."
        )


def existing_file(path: PathLike) -> Path:
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise BadInputError(repr(path), "not a file path", "pass a str or pathlib.Path") from None
    if not p.exists():
        raise BadInputError(
            str(p), "file not found", "check the path (relative paths resolve against the working directory)"
        )
    if p.is_dir():
        raise BadInputError(
            str(p),
            "is a directory, not an image file",
            "pass one image file (one DICOM file per slice or frame)",
        )
    return p


def check_size(p: Path, rows: int, cols: int, what: str = "image") -> None:
    if rows < MIN_SIDE_PX or cols < MIN_SIDE_PX:
        raise BadInputError(
            str(p),
            f"{what} is {cols}x{rows} pixels; at least {MIN_SIDE_PX} pixels per side are needed",
            "use the full-resolution image, not a thumbnail, icon or placeholder",
        )
    if rows * cols > MAX_FRAME_PIXELS:
        raise BadInputError(
            str(p),
            f"{what} is {cols}x{rows} pixels ({rows * cols / 1e6:.0f} MP), "
            f"over the {MAX_FRAME_PIXELS / 1e6:.0f} MP limit",
            "downsample or tile the image first (whole-slide images need a tiler)",
        )
