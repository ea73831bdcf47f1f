"""PNG, JPEG, TIFF and every other format Pillow reads -> 8-bit RGB pixels and technical facts."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from edgemed.errors import BadInputError, EdgemedError
from edgemed.imaging.common import MAX_FRAME_PIXELS, check_size
from edgemed.imaging.windowing import minmax_unit, rgb_image, to_uint8

__all__ = ["describe_raster", "load_raster"]

log = logging.getLogger(__name__)


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


def load_raster(p: Path, frame: int | None) -> Image.Image:
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
        check_size(p, rows, cols)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                if index:
                    im.seek(index)
                    check_size(p, im.size[1], im.size[0], f"frame {index}")
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
            return rgb_image(to_uint8(minmax_unit(np.asarray(out))))
        return out.convert("RGB")


def describe_raster(p: Path) -> dict[str, Any]:
    with _open_pillow(p) as im:
        cols, rows = im.size
        check_size(p, rows, cols)
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
