"""edgemed.imaging on real DICOM samples shipped inside pydicom, plus broken files built here."""

from __future__ import annotations

import io
import logging
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from edgemed.errors import BadInputError, EdgemedError, MissingDependencyError
from edgemed.imaging import WINDOW_PRESETS, describe_medical_image, load_medical_image, resolve_window

# The files bundled in the pydicom wheel. get_testdata_files() would also try to download the
# external pydicom-data set, which takes seconds offline and minutes online.
PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} not found"
    return Path(path)


def arr(img: Image.Image) -> np.ndarray:
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    return np.asarray(img)


def png_bytes(width: int, height: int, data: bytes = b"") -> bytes:
    """A PNG with any IHDR size; Pillow reads the size without decoding the (empty) data."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(data))
        + chunk(b"IEND", b"")
    )


def copy_dataset(name: str, tmp_path: Path, out: str, **changes) -> Path:
    ds = pydicom.dcmread(sample(name))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / out
    ds.save_as(path)
    return path


# ------------------------------------------------------------------------------ DICOM, happy paths


def test_ct_small_default_is_rgb_uint8():
    img = load_medical_image(sample("CT_small.dcm"))
    a = arr(img)
    assert img.size == (128, 128) and a.dtype == np.uint8
    assert a.min() == 0 and a.max() == 255  # no file window: min-max of the HU values
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])


def test_window_is_applied_in_hounsfield_units():
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for window in ("abdomen", (40, 400)):
        got = arr(load_medical_image(sample("CT_small.dcm"), window=window))[..., 0]
        want = np.rint(np.clip((hu - 40) / 400 + 0.5, 0, 1) * 255).astype(np.uint8)
        assert np.array_equal(got, want)


def test_presets_differ_and_names_are_forgiving():
    lung = arr(load_medical_image(sample("CT_small.dcm"), window="lung"))
    bone = arr(load_medical_image(sample("CT_small.dcm"), window="bone"))
    assert not np.array_equal(lung, bone)
    assert resolve_window("Soft-Tissue") == WINDOW_PRESETS["soft_tissue"] == (50.0, 400.0)
    assert resolve_window([-600, 1500]) == WINDOW_PRESETS["lung"]
    assert set(WINDOW_PRESETS) == {"lung", "mediastinum", "bone", "brain", "abdomen", "soft_tissue"}


def test_file_window_is_used_when_no_window_given():
    path = sample("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array.astype(float)
    got = arr(load_medical_image(path))[..., 0]
    assert (got[raw <= center - 0.5 - (width - 1) / 2] == 0).all()
    assert (got[raw > center - 0.5 + (width - 1) / 2] == 255).all()
    assert not np.array_equal(got, arr(load_medical_image(path, window=(center, width * 4)))[..., 0])


def test_monochrome1_is_inverted(tmp_path):
    mono1 = copy_dataset("MR_small.dcm", tmp_path, "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    a2 = arr(load_medical_image(sample("MR_small.dcm"), window=(600, 1600))).astype(int)
    a1 = arr(load_medical_image(mono1, window=(600, 1600))).astype(int)
    assert np.abs(a1 - (255 - a2)).max() <= 1


def test_rgb_and_ybr_pass_through_as_rgb():
    ref = arr(load_medical_image(sample("SC_rgb_rle.dcm"))).astype(int)  # lossless RGB test pattern
    assert len({tuple(px) for px in ref.reshape(-1, 3)[::97]}) > 3  # really colour
    for name in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm"):
        got = arr(load_medical_image(sample(name))).astype(int)
        assert np.abs(got - ref).mean() < 3, name  # YBR converted once, 16/32-bit scaled to 8


def test_palette_color_uses_the_lut():
    img = load_medical_image(sample("examples_palette.dcm"))
    a = arr(img).astype(int)
    assert img.size == (800, 350)
    assert (np.abs(a[..., 0] - a[..., 2]) > 30).mean() > 0.01  # colour, not the raw indices


def test_multiframe_default_middle_and_explicit_frame():
    path = sample("rtdose.dcm")  # 15 frames
    middle = arr(load_medical_image(path))
    assert np.array_equal(middle, arr(load_medical_image(path, frame=7)))
    assert not np.array_equal(arr(load_medical_image(path, frame=0)), arr(load_medical_image(path, frame=14)))
    with pytest.raises(BadInputError, match=r"15 frame\(s\)") as err:
        load_medical_image(path, frame=15)
    assert str(path) in str(err.value) and "fix:" in str(err.value)


def test_multiframe_out_of_range_on_single_frame_file():
    with pytest.raises(BadInputError, match=r"1 frame\(s\)"):
        load_medical_image(sample("CT_small.dcm"), frame=1)


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "MR_small_RLE.dcm",
        "examples_ybr_color.dcm",
    ],
)
def test_compressed_decodes_or_names_the_codec(name):
    try:
        img = load_medical_image(sample(name))
    except MissingDependencyError as exc:
        msg = str(exc)
        assert "dicom-codecs" in msg and ("pylibjpeg" in msg or "gdcm" in msg)
        assert name in msg
    else:
        assert img.mode == "RGB" and min(img.size) >= 8


def test_missing_codec_is_reported_with_the_package(monkeypatch):
    """Whatever is installed here, a syntax without a working plugin names what to install."""
    import pydicom.pixels

    class NoPlugins:
        is_native = False
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]

    def no_handler(*args, **kwargs):
        raise RuntimeError(
            "Unable to decompress 'JPEG 2000' pixel data because all plugins are missing dependencies"
        )

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_handler)
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoPlugins())
    with pytest.raises(MissingDependencyError, match="pylibjpeg-openjpeg") as err:
        load_medical_image(sample("JPEG2000.dcm"))
    assert "edgemed[dicom-codecs]" in str(err.value) and "JPEG 2000" in str(err.value)


def test_every_pydicom_sample_loads_or_is_refused_cleanly():
    files = sorted(PYDICOM_FILES.glob("*.dcm"))
    assert len(files) > 50
    loaded, refused = [], {}
    for path in files:
        try:
            img = load_medical_image(path)
        except EdgemedError as exc:
            assert str(path) in str(exc), path.name
            refused[path.name] = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{path.name}: raw {type(exc).__name__}: {exc}")
        else:
            assert img.mode == "RGB" and min(img.size) >= 8, path.name
            loaded.append(path.name)
    assert len(loaded) >= 40, loaded
    assert {"CT_small.dcm", "MR_small.dcm", "examples_palette.dcm", "examples_rgb_color.dcm"} <= set(loaded)
    assert refused.get("rtplan.dcm") == "BadInputError"  # no PixelData
    assert refused.get("MR_truncated.dcm") == "BadInputError"
    assert refused.get("no_meta.dcm") == "BadInputError"  # no DICM preamble, and we never force


# ------------------------------------------------------------------------------ refusals


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadInputError, match="file not found"):
        load_medical_image(tmp_path / "nope.dcm")
    with pytest.raises(BadInputError, match="directory"):
        load_medical_image(tmp_path)


@pytest.mark.parametrize("name", ["notes.png", "notes.dcm", "notes"])
def test_not_an_image(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is a radiology report, not pixels\n" * 10)
    with pytest.raises(BadInputError) as err:
        load_medical_image(path)
    assert str(path) in str(err.value) and "fix:" in str(err.value)


def test_truncated_dicom(tmp_path):
    data = sample("CT_small.dcm").read_bytes()
    for cut in (len(data) // 2, 140, 1000):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(BadInputError, match="truncated") as err:
            load_medical_image(path)
        assert str(path) in str(err.value)


def test_dicom_without_pixel_data(tmp_path):
    path = copy_dataset("CT_small.dcm", tmp_path, "nopix.dcm", PixelData=None)
    with pytest.raises(BadInputError, match="no PixelData"):
        load_medical_image(path)
    with pytest.raises(BadInputError, match="no PixelData"):
        describe_medical_image(path)


def test_unsupported_photometric(tmp_path):
    path = copy_dataset("CT_small.dcm", tmp_path, "hsv.dcm", PhotometricInterpretation="HSV")
    with pytest.raises(BadInputError, match="unsupported PhotometricInterpretation 'HSV'"):
        load_medical_image(path)


@pytest.mark.parametrize("size", [(1, 1), (7, 64), (64, 3)])
def test_tiny_images(tmp_path, size):
    path = tmp_path / "tiny.png"
    Image.new("L", size).save(path)
    with pytest.raises(BadInputError, match="at least 8 pixels"):
        load_medical_image(path)


def test_tiny_dicom(tmp_path):
    with pytest.raises(BadInputError, match="3x3 pixels"):
        load_medical_image(sample("SC_rgb_small_odd.dcm"))


@pytest.mark.parametrize("size", [(100_000, 100_000), (8_000, 7_500), (60_000, 1_000)])
def test_absurd_size_png_header(tmp_path, size, recwarn):
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes(*size))
    with pytest.raises(BadInputError, match="MP limit") as err:
        load_medical_image(path)
    assert str(path) in str(err.value)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_absurd_size_dicom_header(tmp_path):
    path = copy_dataset("CT_small.dcm", tmp_path, "huge.dcm", Rows=10_000, Columns=10_000)
    with pytest.raises(BadInputError, match="MP limit"):
        load_medical_image(path)


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadInputError, match="truncated or corrupt"):
        load_medical_image(path)


@pytest.mark.parametrize("window", ["liver", "", (40,), (40, 0), (40, -5), ("a", "b"), 3])
def test_bad_window(window):
    with pytest.raises(BadInputError, match="window"):
        load_medical_image(sample("CT_small.dcm"), window=window)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(BadInputError) as err:
        load_medical_image(sample("CT_small.dcm"), window="liver")
    assert "unknown window preset" in str(err.value) and "mediastinum" in str(err.value)


@pytest.mark.parametrize("kwargs", [{"frame": -1}, {"frame": True}, {"frame": 1.5}, {"slice_index": 0}])
def test_bad_indices_for_dicom(kwargs):
    with pytest.raises(BadInputError):
        load_medical_image(sample("CT_small.dcm"), **kwargs)


# ------------------------------------------------------------------------------ privacy


SECRETS = {
    "PatientName": "DOE^JANE^PRIVACYTEST",
    "PatientID": "PID-4242-XYZ",
    "PatientBirthDate": "19510704",
    "StudyDate": "20190312",
    "InstitutionName": "St Privacy Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.99999999999",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.88888888888",
}


def _secret_strings(path: Path) -> list[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    found = {str(ds.get(k, "")) for k in SECRETS} | set(SECRETS.values())
    found |= {"DOE", "JANE", "PRIVACYTEST", "GREGORY"}
    return sorted(s for s in found if len(s) >= 3)


def test_no_metadata_in_errors_logs_or_results(tmp_path, caplog):
    original = pydicom.dcmread(sample("CT_small.dcm"))
    assert str(original.PatientName)  # the shipped sample carries a patient name
    shipped = [str(original.PatientName), str(original.PatientID), str(original.SOPInstanceUID)]

    good = copy_dataset("CT_small.dcm", tmp_path, "good.dcm", **SECRETS)
    data = good.read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) - 5000])
    broken = [
        tmp_path / "truncated.dcm",
        copy_dataset("CT_small.dcm", tmp_path, "nopix.dcm", PixelData=None, **SECRETS),
        copy_dataset("CT_small.dcm", tmp_path, "hsv.dcm", PhotometricInterpretation="HSV", **SECRETS),
        copy_dataset("CT_small.dcm", tmp_path, "tiny.dcm", Rows=4, **SECRETS),
        tmp_path / "badframes.dcm",
    ]
    # A malformed value that pydicom quotes in its own warnings and exception text: written as
    # a valid IS, then patched in the bytes (pydicom will not write it).
    placeholder = copy_dataset("CT_small.dcm", tmp_path, "frames.dcm", NumberOfFrames="87654321", **SECRETS)
    raw = placeholder.read_bytes()
    assert raw.count(b"87654321") == 1
    broken[-1].write_bytes(raw.replace(b"87654321", b"DOE^JANE"))
    messages, results = [], []
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results.append(describe_medical_image(good))
        results.append(load_medical_image(good).size)
        for call in (
            lambda: load_medical_image(good, frame=3),
            lambda: load_medical_image(good, window="liver"),
            *[(lambda p=p: load_medical_image(p)) for p in broken],
            *[(lambda p=p: describe_medical_image(p)) for p in broken[1:3]],
        ):
            with pytest.raises(EdgemedError) as err:
                call()
            messages.append(str(err.value))
            messages.append(repr(err.value))
            cause = err.value.__cause__ or (None if err.value.__suppress_context__ else err.value.__context__)
            messages.append(str(cause or ""))

    texts = (
        messages
        + [r.getMessage() for r in caplog.records]
        + [str(w.message) for w in caught]
        + [repr(results)]
    )
    assert len(messages) >= 3 * 9
    secrets = _secret_strings(good) + shipped
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked into: {text!r}"


def test_describe_is_technical_only():
    info = describe_medical_image(sample("CT_small.dcm"))
    assert info == {
        "format": "dicom",
        "modality": "CT",
        "rows": 128,
        "columns": 128,
        "frames": 1,
        "photometric_interpretation": "MONOCHROME2",
        "bits_stored": 16,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
    }
    assert describe_medical_image(sample("rtdose.dcm"))["frames"] == 15


# ------------------------------------------------------------------------------ PNG / JPEG / TIFF


def test_16bit_png_is_stretched_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(1000, 3000, 64).astype(np.uint16), (32, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    a = arr(load_medical_image(path))[..., 0]
    assert a.min() == 0 and a.max() == 255
    assert np.all(np.diff(a[0].astype(int)) >= 0) and len(np.unique(a)) > 32
    assert describe_medical_image(path)["bits_stored"] == 16


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_medical_image(path).size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1"])
def test_pillow_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode}.png"
    Image.new(mode, (32, 16)).save(path)
    img = load_medical_image(path)
    assert img.mode == "RGB" and img.size == (32, 16)


def test_multipage_tiff_frame(tmp_path):
    pages = [Image.new("L", (16, 16), v) for v in (10, 200)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert arr(load_medical_image(path))[0, 0, 0] == 10
    assert arr(load_medical_image(path, frame=1))[0, 0, 0] == 200
    with pytest.raises(BadInputError, match="2 frame"):
        load_medical_image(path, frame=2)


# ------------------------------------------------------------------------------ NIfTI


def _nifti(tmp_path: Path, name: str, data: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> Path:
    nib = pytest.importorskip("nibabel", reason="nibabel is optional (extra 'nifti')")
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(slope, inter)
    path = tmp_path / name
    nib.save(img, str(path))
    return path


def test_nifti_slices_volumes_and_hu_windows(tmp_path):
    # raw 532 * 2 - 1024 = 40 HU in slice k: the abdomen window (40/400) maps it to mid-grey.
    data = np.zeros((32, 24, 5), dtype=np.int16)
    for k in range(5):
        data[:, :, k] = 532 + 10 * k
    data[0, 0, :] = 2000  # marker at voxel (i=0, j=0)
    path = _nifti(tmp_path, "ct.nii.gz", data, slope=2.0, inter=-1024.0)

    img = load_medical_image(path, window="abdomen")
    a = arr(img)[..., 0]
    assert img.size == (32, 24)  # i runs left-right, j bottom-to-top
    assert a[-1, 0] == 255  # the marker is at the bottom-left
    assert a[5, 5] == round((2 * 552 - 1024 - 40) / 400 * 255 + 127.5)  # middle slice, k=2
    assert arr(load_medical_image(path, window="abdomen", slice_index=0))[5, 5, 0] == 128
    with pytest.raises(BadInputError, match="5 slice"):
        load_medical_image(path, slice_index=5)
    info = describe_medical_image(path)
    assert (info["format"], info["rows"], info["columns"], info["frames"]) == ("nifti", 24, 32, 5)

    series = np.stack([np.full((16, 16, 3), v, np.float32) for v in (0.0, 1.0)], axis=-1)
    path4 = _nifti(tmp_path, "series.nii", series)
    assert arr(load_medical_image(path4, window=(0.5, 1)))[5, 5, 0] == 0  # volume 0 by default
    assert arr(load_medical_image(path4, window=(0.5, 1), frame=1))[5, 5, 0] == 255
    with pytest.raises(BadInputError, match="2 volume"):
        load_medical_image(path4, frame=2)


def test_nifti_corrupt(tmp_path):
    pytest.importorskip("nibabel", reason="nibabel is optional (extra 'nifti')")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    with pytest.raises(BadInputError, match="NIfTI"):
        load_medical_image(bad)


def test_nifti_without_nibabel_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "volume.nii"
    path.write_bytes(b"\x00" * 400)
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match="nibabel") as err:
        load_medical_image(path)
    assert "edgemed[nifti]" in str(err.value)


def test_importing_imaging_does_not_import_torch():
    import subprocess

    code = "import sys, edgemed.imaging; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
