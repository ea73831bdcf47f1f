"""NIfTI volumes (.nii, .nii.gz) -> one 8-bit RGB slice and technical facts, through nibabel
(optional: the 'nifti' extra, imported on first use)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgemed.errors import BadInputError, MissingDependencyError
from edgemed.imaging.common import check_size
from edgemed.imaging.windowing import minmax_unit, rgb_image, to_uint8, window_unit

__all__ = ["describe_nifti", "load_nifti"]


def _nibabel(p: Path) -> Any:
    try:
        import nibabel
    except ImportError:
        raise MissingDependencyError(f"{p} (NIfTI)", "nibabel", "nifti") from None
    return nibabel


def _open_nifti(p: Path) -> tuple[Any, tuple[int, ...]]:
    nib = _nibabel(p)
    try:
        img = nib.load(str(p))
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:  # ImageFileError, EOFError, gzip/zlib errors ...
        raise BadInputError(
            str(p),
            f"not a readable NIfTI file ({type(exc).__name__})",
            "check that the file is complete (a .nii.gz must be gzip-compressed NIfTI-1/2)",
        ) from None
    while len(shape) > 2 and shape[-1] == 1:  # (x, y, z, 1) and (x, y, 1) are common
        shape = shape[:-1]
    if len(shape) < 2 or len(shape) > 4:
        raise BadInputError(
            str(p),
            f"NIfTI data has shape {shape}; 2-D, 3-D or 4-D data is needed",
            "export one volume or series",
        )
    return img, shape


def load_nifti(
    p: Path, win: tuple[float, float] | None, frame: int | None, slice_index: int | None
) -> Image.Image:
    img, shape = _open_nifti(p)
    check_size(p, shape[1], shape[0], "each slice")
    n_slices = shape[2] if len(shape) >= 3 else 1
    n_volumes = shape[3] if len(shape) == 4 else 1
    s = n_slices // 2 if slice_index is None else int(slice_index)
    v = 0 if frame is None else int(frame)
    if s >= n_slices:
        raise BadInputError(
            f"{p} (slice_index={slice_index})",
            f"slice index out of range: the volume has {n_slices} slice(s) along its last spatial axis",
            f"pass slice_index between 0 and {n_slices - 1}, or omit it for the middle slice",
        )
    if v >= n_volumes:
        raise BadInputError(
            f"{p} (frame={frame})",
            f"volume index out of range: the file has {n_volumes} volume(s)",
            f"pass frame between 0 and {n_volumes - 1}, or omit it for the first volume",
        )
    full = tuple(int(x) for x in img.shape)
    key: list[Any] = [slice(None), slice(None)] + [0] * (len(full) - 2)
    if len(full) >= 3:
        key[2] = s
    if len(full) >= 4:
        key[3] = v
    try:
        # Slicing the proxy reads one slice and applies scl_slope/scl_inter (HU for CT).
        data = np.asarray(img.dataobj[tuple(key)])
    except Exception as exc:
        raise BadInputError(
            str(p), f"NIfTI voxel data is truncated or corrupt ({type(exc).__name__})", "re-export the file"
        ) from None
    if data.dtype.names is not None or np.iscomplexobj(data):
        raise BadInputError(
            str(p), f"NIfTI voxel type {data.dtype} is not supported", "export scalar (grayscale) data"
        )
    # Voxel (i, j) -> display (row, col): i runs left-right, j bottom-to-top, as viewers show RAS data.
    data = np.rot90(data.astype(np.float64))
    if win is not None:
        unit = window_unit(data, *win)
    else:
        cal_min, cal_max = (float(img.header.get(k, 0) or 0) for k in ("cal_min", "cal_max"))
        unit = (
            window_unit(data, (cal_min + cal_max) / 2, cal_max - cal_min)
            if cal_max > cal_min
            else minmax_unit(data)
        )
    return rgb_image(to_uint8(unit))


def describe_nifti(p: Path) -> dict[str, Any]:
    img, shape = _open_nifti(p)
    bits = img.header.get("bitpix", None)
    return {
        "format": "nifti",
        "modality": None,
        "rows": shape[1],
        "columns": shape[0],
        "frames": shape[2] if len(shape) >= 3 else 1,
        "photometric_interpretation": None,
        "bits_stored": int(bits) if bits is not None else None,
        "transfer_syntax_uid": None,
    }
