"""The two entry points: pick the reader for a file (DICOM, NIfTI or Pillow) and hand it on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from edgemed.errors import BadInputError
from edgemed.imaging.common import PathLike, check_index, existing_file
from edgemed.imaging.dicom import describe_dicom, load_dicom
from edgemed.imaging.nifti import describe_nifti, load_nifti
from edgemed.imaging.raster import describe_raster, load_raster
from edgemed.imaging.windowing import Window, resolve_window

__all__ = ["describe_medical_image", "load_medical_image"]

_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_medical_image(
    path: PathLike,
    window: Window = None,
    frame: int | None = None,
    slice_index: int | None = None,
) -> Image.Image:
    """Read `path` and return an 8-bit RGB image ready for a vision processor.

    - DICOM: Modality LUT (rescale to HU for CT), then VOI: `window` if given, else the file's
      VOI LUT or window, else min-max; MONOCHROME1 inverted; colour and palette images as
      stored. `frame` picks a frame of a multi-frame file (default: the middle one).
    - NIfTI (.nii, .nii.gz; needs nibabel): `slice_index` picks a slice along the last spatial
      axis (default: the middle one), `frame` a volume of a 4-D series (default 0); `window`
      applies to the scaled values (HU for CT); without it the header's cal_min/cal_max, else
      min-max of the slice.
    - Other formats Pillow reads: EXIF orientation applied; 16-bit and float grayscale scaled
      by min-max; `frame` picks a page of a multi-page file (default 0).

    `window` only changes grayscale DICOM and NIfTI data: colour images and PNG/JPEG pixels are
    already display values. Every refusal is a `BadInputError` naming the file and the fix.
    """
    win = resolve_window(window)
    check_index("frame", frame)
    check_index("slice_index", slice_index)
    p = existing_file(path)
    kind = _sniff(p)
    if kind != "nifti" and slice_index is not None:
        raise BadInputError(
            f"{p} (slice_index={slice_index})",
            "slice_index applies to NIfTI volumes only",
            "for a multi-frame DICOM or a multi-page image, pass frame= instead",
        )
    if kind == "dicom":
        return load_dicom(p, win, frame)
    if kind == "nifti":
        return load_nifti(p, win, frame, slice_index)
    return load_raster(p, frame)


def describe_medical_image(path: PathLike) -> dict[str, Any]:
    """Technical, non-identifying facts about an image, for calibration manifests.

    Keys: format, modality, rows, columns, frames, photometric_interpretation, bits_stored,
    transfer_syntax_uid (None where a format has no such notion). No pixel data is decoded.
    """
    p = existing_file(path)
    kind = _sniff(p)
    if kind == "dicom":
        return describe_dicom(p)
    if kind == "nifti":
        return describe_nifti(p)
    return describe_raster(p)


def _sniff(p: Path) -> str:
    """'dicom' | 'nifti' | 'pillow', by the DICM preamble first, then by the suffix."""
    name = p.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise BadInputError(
            str(p), f"cannot be read ({exc.strerror or type(exc).__name__})", "check the file's permissions"
        ) from None
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    if name.endswith(_DICOM_SUFFIXES):
        return "dicom"
    return "pillow"
