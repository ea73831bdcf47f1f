"""Read one medical image (DICOM, NIfTI, PNG/JPEG/TIFF ...) as an 8-bit RGB PIL image.

This is the single entry point through which calibration sets, benchmarks and the runtime turn
a file into pixels, so every consumer sees the same windowing and the same refusals. It imports
numpy, Pillow and pydicom only (never torch): the on-device runtime uses it too.

    loader.py     load_medical_image, describe_medical_image: pick the reader by the file's content
    dicom.py      DICOM through pydicom; quiet_pydicom() keeps element values out of logs and warnings
    nifti.py      NIfTI volumes through nibabel (the 'nifti' extra)
    raster.py     PNG, JPEG, TIFF and everything else Pillow reads
    windowing.py  CT window presets, windowing and min-max scaling to 8 bits
    common.py     path and index checks, pixel size limits
"""

from __future__ import annotations

from edgemed.imaging.common import MAX_FRAME_PIXELS, MIN_SIDE_PX, PathLike
from edgemed.imaging.dicom import quiet_pydicom
from edgemed.imaging.loader import describe_medical_image, load_medical_image
from edgemed.imaging.windowing import WINDOW_PRESETS, Window, resolve_window

__all__ = [
    "MAX_FRAME_PIXELS",
    "MIN_SIDE_PX",
    "PathLike",
    "WINDOW_PRESETS",
    "Window",
    "describe_medical_image",
    "load_medical_image",
    "quiet_pydicom",
    "resolve_window",
]
