"""Read one medical image (DICOM, NIfTI, PNG/JPEG/TIFF ...) as an 8-bit RGB PIL image.

This is the single entry point through which calibration sets, benchmarks and the runtime turn
a file into pixels, so every consumer sees the same windowing and the same refusals. It imports
numpy, Pillow and pydicom only (never torch): the on-device runtime uses it too.

Privacy: DICOM headers carry patient data. Nothing read from a header other than technical facts
(photometric interpretation, transfer syntax, sizes, bit depth, modality) may reach an exception
message, a log record, a warning or a return value. pydicom itself warns and logs element values
when it meets malformed ones, so every pydicom call runs inside `_quiet_pydicom()`, and the few
pydicom error texts we pass on are scrubbed of the dataset's identifying values first.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from edgemed.errors import BadInputError, EdgemedError, MissingDependencyError

__all__ = ["WINDOW_PRESETS", "describe_medical_image", "load_medical_image", "resolve_window"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
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

MIN_SIDE_PX = 8
MAX_FRAME_PIXELS = 50_000_000

# Photometric interpretations whose decoded pixels we know how to show. pydicom's pixel_array
# (raw=False) already returns RGB for YBR_FULL/YBR_FULL_422, and JPEG 2000 decoders return RGB
# for YBR_ICT/YBR_RCT, so all colour cases arrive here as RGB except PALETTE COLOR.
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PALETTE = "PALETTE COLOR"

_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")

# What to install when pydicom has no working decoder for a compressed transfer syntax
# (pip-installable as written). RLE and Deflate need nothing: pydicom decodes them with numpy.
_CODEC_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
}
_CODEC_FALLBACK = "python-gdcm"
_CODEC_EXTRA = "dicom-codecs"


# --------------------------------------------------------------------------------------------
# public API


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
    _check_index("frame", frame)
    _check_index("slice_index", slice_index)
    p = _existing_file(path)
    kind = _sniff(p)
    if kind != "nifti" and slice_index is not None:
        raise BadInputError(
            f"{p} (slice_index={slice_index})",
            "slice_index applies to NIfTI volumes only",
            "for a multi-frame DICOM or a multi-page image, pass frame= instead",
        )
    if kind == "dicom":
        return _load_dicom(p, win, frame)
    if kind == "nifti":
        return _load_nifti(p, win, frame, slice_index)
    return _load_pillow(p, frame)


def describe_medical_image(path: PathLike) -> dict[str, Any]:
    """Technical, non-identifying facts about an image, for calibration manifests.

    Keys: format, modality, rows, columns, frames, photometric_interpretation, bits_stored,
    transfer_syntax_uid (None where a format has no such notion). No pixel data is decoded.
    """
    p = _existing_file(path)
    kind = _sniff(p)
    if kind == "dicom":
        return _describe_dicom(p)
    if kind == "nifti":
        return _describe_nifti(p)
    return _describe_pillow(p)


# --------------------------------------------------------------------------------------------
# shared checks


def _check_index(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise BadInputError(
            f"{name}={value!r}", "must be a non-negative integer index", f"pass {name}=0, 1, ..."
        )


def _existing_file(path: PathLike) -> Path:
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


def _check_size(p: Path, rows: int, cols: int, what: str = "image") -> None:
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


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (NaN allowed) -> uint8."""
    unit = np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _window_unit(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    # LINEAR_EXACT (PS3.3 C.11.2.1.3.2): center and width taken literally, as presets are quoted.
    return np.clip((arr.astype(np.float64) - center) / width + 0.5, 0.0, 1.0)


def _minmax_unit(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros_like(arr)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:  # a constant image: show it black rather than divide by zero
        return np.zeros_like(arr)
    return (arr - lo) / (hi - lo)


def _rgb(gray_or_rgb: np.ndarray) -> Image.Image:
    if gray_or_rgb.ndim == 2:
        gray_or_rgb = np.repeat(gray_or_rgb[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(gray_or_rgb, dtype=np.uint8)).convert("RGB")


# --------------------------------------------------------------------------------------------
# DICOM

_quiet = threading.local()


class _DropWhileQuiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "depth", 0)


_PYDICOM_FILTER = _DropWhileQuiet()


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records: they quote element values (names, dates)."""
    # A logger's filters do not see records propagated from its children, so every pydicom
    # logger gets the filter; it drops records only in this thread and only inside this block.
    names = ["pydicom"] + [n for n in list(logging.Logger.manager.loggerDict) if n.startswith("pydicom.")]
    for name in names:
        logger = logging.getLogger(name)
        if _PYDICOM_FILTER not in logger.filters:
            logger.addFilter(_PYDICOM_FILTER)
    _quiet.depth = getattr(_quiet, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _quiet.depth -= 1


_IDENTIFYING_VRS = frozenset(
    {"PN", "DA", "DT", "TM", "UI", "LO", "SH", "AE", "AS", "ST", "LT", "UT", "UC", "UR"}
)


def _scrub(text: str, ds: Any) -> str:
    """Remove every identifying value of `ds` (names, IDs, dates, UIDs, institutions) from `text`."""
    values: set[str] = set()
    complete = True
    for dataset in (ds, getattr(ds, "file_meta", None)):
        if dataset is None:
            continue
        try:
            for elem in dataset.iterall():
                if elem.VR in _IDENTIFYING_VRS:
                    for v in elem.value if elem.VM > 1 else [elem.value]:
                        values.add(str(v).strip())
                        values.update(part.strip() for part in str(v).replace("=", "^").split("^"))
        except Exception:  # a malformed element stops the walk: scrub harder below
            complete = False
    for v in sorted(values, key=len, reverse=True):
        if len(v) >= 3:
            text = text.replace(v, "<redacted>")
    if not complete:  # dates, times and UIDs are digit runs
        text = re.sub(r"\d[\d.]{5,}", "<redacted>", text)
    return text


def _cs(value: Any) -> str:
    """A code string fit for a message: only the characters the CS VR allows."""
    s = str(value or "").strip()
    return s if re.fullmatch(r"[A-Z0-9_ ]{1,16}", s) else "<non-standard value>"


def _int(ds: Any, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, None)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return default


def _read_dicom(p: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    with _quiet_pydicom():
        try:
            # Large elements (PixelData) stay on disk until used; never force=True: a file
            # without the DICM header is refused rather than parsed as whatever it holds.
            return pydicom.dcmread(p, defer_size="2 MB")
        except InvalidDicomError:
            raise BadInputError(
                str(p),
                "not a DICOM Part 10 file (no 'DICM' preamble and File Meta Information)",
                "if it is a bare DICOM dataset, re-save it with a File Meta header "
                "(e.g. `dcmconv` or `gdcmconv`); edgemed does not guess at headerless files",
            ) from None
        except Exception as exc:  # pydicom raises many types on damaged files; none may leak
            raise BadInputError(
                str(p),
                f"DICOM header is truncated or corrupt ({type(exc).__name__})",
                "re-export or re-transfer the file; check it with `dciodvfy` or `dcmdump`",
            ) from None


def _pixel_element(ds: Any) -> str | None:
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if kw in ds:
            return kw
    return None


def _ts(ds: Any) -> Any:
    meta = getattr(ds, "file_meta", None)
    return None if meta is None else meta.get("TransferSyntaxUID", None)


def _ts_name(ts: Any) -> str:
    if ts is None:
        return "unknown transfer syntax"
    name = getattr(ts, "name", "") or str(ts)
    return name if getattr(ts, "is_transfer_syntax", False) else f"transfer syntax {name}"


def _check_dicom_image(p: Path, ds: Any) -> tuple[str, int, int, int]:
    """The checks shared by load and describe -> (photometric, rows, cols, frames)."""
    if _pixel_element(ds) is None:
        # pydicom stops quietly at end of file, so a truncated image also lands here.
        if len(ds) == 0:
            raise BadInputError(
                str(p),
                "DICOM file ends after its File Meta header: it is empty or truncated",
                "re-export or re-transfer the file",
            )
        modality = _cs(ds.get("Modality", "")) if "Modality" in ds else "unknown"
        raise BadInputError(
            str(p),
            f"DICOM file has no PixelData (modality {modality}): it is a non-image object "
            "(structured report, RT plan, DICOMDIR, waveform ...) or a truncated file",
            "pass the image files of the study; if this one should be an image, re-transfer it",
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in _MONOCHROME + _COLOUR + (_PALETTE,):
        reason = (
            f"unsupported PhotometricInterpretation '{_cs(photometric)}'"
            if photometric
            else "PhotometricInterpretation is missing"
        )
        raise BadInputError(
            str(p),
            reason,
            f"convert the image to one of {', '.join(_MONOCHROME + _COLOUR + (_PALETTE,))} "
            "(e.g. `gdcmconv --raw`)",
        )
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    _check_size(p, rows or 0, cols or 0, "each frame")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames is None or frames < 1:
        frames = 1
    return photometric, rows or 0, cols or 0, frames


def _decode_frame(p: Path, ds: Any, index: int, frames: int) -> np.ndarray:
    from pydicom.pixels import get_decoder, pixel_array

    ts = _ts(ds)
    with _quiet_pydicom():
        if frames > 1 and str(ts) != "1.2.840.10008.1.2.1.99":
            # From the path, pydicom reads only this frame's bytes (a cine loop or an enhanced
            # CT can be gigabytes). Its path reader is stricter than dcmread (deflate, odd
            # offset tables), so a failure here falls through to the dataset below.
            try:
                return pixel_array(str(p), index=index)
            except Exception:
                pass
        try:
            # raw=False: YBR_FULL / YBR_FULL_422 come back as RGB.
            return pixel_array(ds, index=index)
        except Exception as exc:
            failure = exc
    # Decide between "install a codec" and "the file is damaged", from what pydicom has installed.
    try:
        decoder = get_decoder(ts) if ts is not None else None
    except Exception:  # NotImplementedError: a syntax pydicom has no decoder for at all
        decoder = None
    tname = _ts_name(ts)
    available = set(getattr(decoder, "available_plugins", ()) or ())
    recommended = _CODEC_PACKAGES.get(str(ts))
    if decoder is None and ts is not None and getattr(ts, "is_compressed", True):
        raise BadInputError(
            str(p),
            f"pixel data uses {tname}, which no DICOM decoder supports",
            "transcode to Explicit VR Little Endian (e.g. `gdcmconv --raw` or `dcmdjpeg`)",
        ) from None
    if decoder is not None and not decoder.is_native:
        if recommended is not None and "pylibjpeg" not in available:
            # Nothing installed for this syntax, or only Pillow, which refuses some variants
            # (12-bit JPEG, some JPEG 2000): the pylibjpeg codecs are the fix in both cases.
            raise MissingDependencyError(f"{p} ({tname} pixel data)", recommended, _CODEC_EXTRA) from None
        if recommended is None and not available:
            raise MissingDependencyError(f"{p} ({tname} pixel data)", _CODEC_FALLBACK, _CODEC_EXTRA) from None
    detail = _scrub(" ".join(str(failure).split())[:400] or type(failure).__name__, ds)
    fix = "the file is truncated or corrupt, or its image header (group 0028) is wrong; re-export it"
    if decoder is not None and not decoder.is_native and "gdcm" not in available:
        fix += (
            f" (or try `pip install {_CODEC_FALLBACK}`, which decodes some files the other decoders refuse)"
        )
    raise BadInputError(str(p), f"pixel data could not be decoded ({tname}): {detail}", fix) from None


def _dicom_gray_unit(p: Path, ds: Any, arr: np.ndarray, win: tuple[float, float] | None) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    with _quiet_pydicom():
        try:
            values = apply_modality_lut(arr, ds)
        except Exception:
            raise BadInputError(
                str(p),
                "the Modality LUT (RescaleSlope / RescaleIntercept / ModalityLUTSequence) is malformed",
                "fix or remove the rescale elements, then re-export",
            ) from None
        if win is not None:
            return _window_unit(values, *win)
        try:
            if ds.get("VOILUTSequence"):
                item = ds.VOILUTSequence[0]
                entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
                lut = apply_voi_lut(np.arange(first, first + entries, dtype=np.int64), ds, prefer_lut=True)
                if np.issubdtype(values.dtype, np.floating):
                    values = np.rint(values).astype(np.int64)
                out = apply_voi_lut(values, ds, prefer_lut=True)
            elif "WindowCenter" in ds and "WindowWidth" in ds:
                # The window's output range depends on bit depth and rescale; probing the same
                # function at the extremes gives it without copying pydicom's rules.
                with np.errstate(over="ignore"):
                    lut = apply_voi_lut(np.array([-1e12, 1e12]), ds, prefer_lut=False)
                out = apply_voi_lut(values, ds, prefer_lut=False)
            else:
                return _minmax_unit(values)
            lo, hi = float(np.min(lut)), float(np.max(lut))
            if hi > lo:
                return np.clip((out.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
        except Exception:
            log.debug("%s: the file's VOI LUT / window is unusable; using min-max", p)
        return _minmax_unit(values)


def _colour_to_uint8(ds: Any, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return _to_uint8(_minmax_unit(arr))
    bits = _int(ds, "BitsStored", None) or arr.dtype.itemsize * 8
    top = float(2**bits - 1)
    if arr.max(initial=0) > top:
        top = float(np.iinfo(arr.dtype).max)
    return _to_uint8(arr.astype(np.float64) / top)


def _palette_to_uint8(p: Path, ds: Any, arr: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    with _quiet_pydicom():
        try:
            rgb = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception:
            raise BadInputError(
                str(p),
                "PALETTE COLOR image with missing or malformed palette lookup tables",
                "re-export the image as RGB",
            ) from None
    top = float(2**bits - 1) if bits in (8, 16) else float(np.iinfo(rgb.dtype).max)
    if rgb.max(initial=0) > top:
        top = float(np.iinfo(rgb.dtype).max)
    return _to_uint8(rgb.astype(np.float64) / top)


def _load_dicom(p: Path, win: tuple[float, float] | None, frame: int | None) -> Image.Image:
    # Every touch of `ds` may make pydicom warn with an element's value, so all of it is quiet.
    with _quiet_pydicom():
        return _load_dicom_quiet(p, win, frame)


def _load_dicom_quiet(p: Path, win: tuple[float, float] | None, frame: int | None) -> Image.Image:
    ds = _read_dicom(p)
    photometric, rows, cols, frames = _check_dicom_image(p, ds)
    index = frames // 2 if frame is None else int(frame)
    if index >= frames:
        raise BadInputError(
            f"{p} (frame={frame})",
            f"frame index out of range: the file has {frames} frame(s)",
            f"pass frame between 0 and {frames - 1}, or omit it for the middle frame",
        )
    arr = _decode_frame(p, ds, index, frames)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or arr.shape[:2] != (rows, cols):
        raise BadInputError(
            str(p),
            f"decoded pixel array has shape {tuple(arr.shape)}, expected {rows}x{cols}",
            "the image header (Rows, Columns, SamplesPerPixel, NumberOfFrames) is wrong; re-export the file",
        )
    if photometric == _PALETTE:
        out = _palette_to_uint8(p, ds, arr)
    elif arr.ndim == 3:
        out = _colour_to_uint8(ds, arr)
    else:
        unit = _dicom_gray_unit(p, ds, arr, win)
        if photometric == "MONOCHROME1":  # stored with white as the lowest value
            unit = 1.0 - unit
        out = _to_uint8(unit)
    log.debug("%s: DICOM %s frame %d/%d, %dx%d", p, photometric, index, frames, cols, rows)
    return _rgb(out)


def _describe_dicom(p: Path) -> dict[str, Any]:
    with _quiet_pydicom():
        ds = _read_dicom(p)
        photometric, rows, cols, frames = _check_dicom_image(p, ds)
        modality = _cs(ds.get("Modality", "")) if ds.get("Modality", None) else None
        ts = _ts(ds)
        return {
            "format": "dicom",
            "modality": modality,
            "rows": rows,
            "columns": cols,
            "frames": frames,
            "photometric_interpretation": photometric,
            "bits_stored": _int(ds, "BitsStored", None),
            # Transfer syntax UIDs are standard constants, not instance identifiers.
            "transfer_syntax_uid": str(ts)
            if ts is not None and getattr(ts, "is_transfer_syntax", False)
            else None,
        }


# --------------------------------------------------------------------------------------------
# NIfTI


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


def _load_nifti(
    p: Path, win: tuple[float, float] | None, frame: int | None, slice_index: int | None
) -> Image.Image:
    img, shape = _open_nifti(p)
    _check_size(p, shape[1], shape[0], "each slice")
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
        unit = _window_unit(data, *win)
    else:
        cal_min, cal_max = (float(img.header.get(k, 0) or 0) for k in ("cal_min", "cal_max"))
        unit = (
            _window_unit(data, (cal_min + cal_max) / 2, cal_max - cal_min)
            if cal_max > cal_min
            else _minmax_unit(data)
        )
    return _rgb(_to_uint8(unit))


def _describe_nifti(p: Path) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------
# PNG / JPEG / TIFF and everything else Pillow reads


@contextmanager
def _open_pillow(p: Path) -> Iterator[Image.Image]:
    # Our own size limit (below Pillow's) fires first; turning the bomb warning into an error
    # covers formats whose size Pillow learns only while decoding. Nothing global is changed.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(p)
        except UnidentifiedImageError:
            raise BadInputError(
                str(p),
                "not an image or DICOM file that edgemed can read",
                "pass a DICOM (.dcm), NIfTI (.nii/.nii.gz) or PNG/JPEG/TIFF file",
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadInputError(
                str(p),
                f"image header declares an absurd size (over the {MAX_FRAME_PIXELS / 1e6:.0f} MP limit)",
                "downsample or tile the image first",
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadInputError(
                str(p), f"image header is corrupt ({type(exc).__name__})", "re-export the image"
            ) from None
        with im:
            yield im


def _n_frames(p: Path, im: Image.Image) -> int:
    try:  # GIF and some TIFFs scan the whole file to count frames
        return int(getattr(im, "n_frames", 1) or 1)
    except Exception as exc:
        raise BadInputError(
            str(p),
            f"image data is truncated or corrupt ({type(exc).__name__})",
            "re-export or re-transfer the file",
        ) from None


def _load_pillow(p: Path, frame: int | None) -> Image.Image:
    with _open_pillow(p) as im:
        n_frames = _n_frames(p, im)
        index = 0 if frame is None else int(frame)
        if index >= n_frames:
            raise BadInputError(
                f"{p} (frame={frame})",
                f"frame index out of range: the image has {n_frames} frame(s)",
                f"pass frame between 0 and {n_frames - 1}, or omit it",
            )
        cols, rows = im.size
        _check_size(p, rows, cols)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                if index:
                    im.seek(index)
                    _check_size(p, im.size[1], im.size[0], f"frame {index}")
                # A truncated file fails here, unless the host app set LOAD_TRUNCATED_IMAGES.
                if ImageFile.LOAD_TRUNCATED_IMAGES:
                    log.debug(
                        "%s: Pillow's LOAD_TRUNCATED_IMAGES is set; a truncated file would load partially", p
                    )
                im.load()
                out = ImageOps.exif_transpose(im)
            except EdgemedError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise BadInputError(
                    str(p), "image is too large to decode safely", "downsample or tile the image first"
                ) from None
            except Exception as exc:  # OSError 'image file is truncated', zlib/SyntaxError ...
                raise BadInputError(
                    str(p),
                    f"image data is truncated or corrupt ({type(exc).__name__})",
                    "re-export or re-transfer the file",
                ) from None
        if out.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            # 16-bit / float grayscale: stretch to the data's own range (clipping would saturate).
            return _rgb(_to_uint8(_minmax_unit(np.asarray(out))))
        return out.convert("RGB")


def _describe_pillow(p: Path) -> dict[str, Any]:
    with _open_pillow(p) as im:
        cols, rows = im.size
        _check_size(p, rows, cols)
        bits = (
            16 if im.mode.startswith("I;16") else 32 if im.mode in ("I", "F") else 1 if im.mode == "1" else 8
        )
        return {
            "format": (im.format or "unknown").lower(),
            "modality": None,
            "rows": rows,
            "columns": cols,
            "frames": _n_frames(p, im),
            "photometric_interpretation": None,
            "bits_stored": bits,
            "transfer_syntax_uid": None,
        }
