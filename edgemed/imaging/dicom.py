"""DICOM files -> 8-bit RGB pixels and technical facts, through pydicom (imported on first use).

Privacy: DICOM headers carry patient data. Nothing read from a header other than technical facts
(photometric interpretation, transfer syntax, sizes, bit depth, modality) may reach an exception
message, a log record, a warning or a return value. pydicom itself warns and logs element values
when it meets malformed ones, so every pydicom call runs inside `quiet_pydicom()`, and the few
pydicom error texts we pass on are scrubbed of the dataset's identifying values first.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgemed.errors import BadInputError, MissingDependencyError
from edgemed.imaging.common import check_size
from edgemed.imaging.windowing import minmax_unit, rgb_image, to_uint8, window_unit

__all__ = ["describe_dicom", "load_dicom", "quiet_pydicom"]

log = logging.getLogger(__name__)

# Photometric interpretations whose decoded pixels we know how to show. pydicom's pixel_array
# (raw=False) already returns RGB for YBR_FULL/YBR_FULL_422, and JPEG 2000 decoders return RGB
# for YBR_ICT/YBR_RCT, so all colour cases arrive here as RGB except PALETTE COLOR.
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PALETTE = "PALETTE COLOR"

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


_quiet = threading.local()


class _DropWhileQuiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "depth", 0)


_PYDICOM_FILTER = _DropWhileQuiet()


@contextmanager
def quiet_pydicom() -> Iterator[None]:
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


# DICOM PS3.3 C.7.3.1.1.1 "Modality": the defined terms (current and retired). A Modality element is
# free to hold anything a sending system put there (a crafted file held a patient's name); only
# these terms ever leave this module, anything else reads "unknown".
MODALITY_TERMS = frozenset("""
    ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DMS DG DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD
    IO IOL IVOCT IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN
    POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV
    SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC
    AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
""".split())


def modality_term(value: Any) -> str:
    """The DICOM Modality as a defined term, else "unknown" (never free text from the file)."""
    s = str(value or "").strip().upper()
    return s if s in MODALITY_TERMS else "unknown"


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

    with quiet_pydicom():
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
        modality = modality_term(ds.get("Modality", ""))
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
    check_size(p, rows or 0, cols or 0, "each frame")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames is None or frames < 1:
        frames = 1
    return photometric, rows or 0, cols or 0, frames


def _decode_frame(p: Path, ds: Any, index: int, frames: int) -> np.ndarray:
    from pydicom.pixels import get_decoder, pixel_array

    ts = _ts(ds)
    with quiet_pydicom():
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

    with quiet_pydicom():
        try:
            values = apply_modality_lut(arr, ds)
        except Exception:
            raise BadInputError(
                str(p),
                "the Modality LUT (RescaleSlope / RescaleIntercept / ModalityLUTSequence) is malformed",
                "fix or remove the rescale elements, then re-export",
            ) from None
        if win is not None:
            return window_unit(values, *win)
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
                return minmax_unit(values)
            lo, hi = float(np.min(lut)), float(np.max(lut))
            if hi > lo:
                return np.clip((out.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
        except Exception:
            log.debug("%s: the file's VOI LUT / window is unusable; using min-max", p)
        return minmax_unit(values)


def _colour_to_uint8(ds: Any, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return to_uint8(minmax_unit(arr))
    bits = _int(ds, "BitsStored", None) or arr.dtype.itemsize * 8
    top = float(2**bits - 1)
    if arr.max(initial=0) > top:
        top = float(np.iinfo(arr.dtype).max)
    return to_uint8(arr.astype(np.float64) / top)


def _palette_to_uint8(p: Path, ds: Any, arr: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    with quiet_pydicom():
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
    return to_uint8(rgb.astype(np.float64) / top)


def load_dicom(p: Path, win: tuple[float, float] | None, frame: int | None) -> Image.Image:
    # Every touch of `ds` may make pydicom warn with an element's value, so all of it is quiet.
    with quiet_pydicom():
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
        out = to_uint8(unit)
    log.debug("%s: DICOM %s frame %d/%d, %dx%d", p, photometric, index, frames, cols, rows)
    return rgb_image(out)


def describe_dicom(p: Path) -> dict[str, Any]:
    with quiet_pydicom():
        ds = _read_dicom(p)
        photometric, rows, cols, frames = _check_dicom_image(p, ds)
        modality = modality_term(ds.get("Modality", "")) if ds.get("Modality", None) else None
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
