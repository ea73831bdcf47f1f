"""Calibration sets: stratified by modality, pixels only, no patient identifier anywhere."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom.data import get_testdata_file

from edgemed.calibration.sets import build_calibration_set, load_calibration_set, resolve_calibration_set
from edgemed.cli import main
from edgemed.errors import BadInputError

DICOMS = ("CT_small.dcm", "MR_small.dcm")
FAKE_PNG_NAME = "DOE^JOHNATHAN"


@pytest.fixture()
def source(tmp_path) -> Path:
    """Two of pydicom's test DICOMs (real-looking headers), three PNGs (one with a text chunk
    naming a patient), a sidecar to ignore and one unreadable file."""
    src = tmp_path / "Patient_Doe_John"
    (src / "ct").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct" / "CT_small.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "MR_small.dcm")
    rng = np.random.default_rng(0)
    for i in range(3):
        info = PngInfo()
        if i == 0:
            info.add_text("PatientName", FAKE_PNG_NAME)
        Image.fromarray(rng.integers(0, 256, (32, 40), dtype=np.uint8)).save(src / f"xray_{i}.png", pnginfo=info)
    (src / "notes.txt").write_text("not an image")
    (src / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    return src


def _identifiers() -> set[str]:
    """Every patient/study identifying value of the test DICOMs: names, IDs, dates, times, UIDs."""
    values: set[str] = set()
    for name in DICOMS:
        ds = pydicom.dcmread(get_testdata_file(name))
        for elem in ds.iterall():
            if elem.VR in ("PN", "LO", "SH", "DA", "DT", "TM", "UI", "AS") and elem.value not in (None, ""):
                vals = elem.value if elem.VM > 1 else [elem.value]
                for v in vals:
                    s = str(v).strip()
                    if elem.VR == "UI" and pydicom.uid.UID(s).is_valid and pydicom.uid.UID(s).name != s:
                        continue  # a standard UID (SOP class, transfer syntax), the same in every file
                    values.add(s)
                    values.update(p for p in s.split("^") if p)
        values.update({str(ds.PatientName), ds.PatientID})
    return {v for v in values if len(v) >= 4}


def _all_bytes(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]


def test_cli_build_from_mixed_folder(source, tmp_path):
    out = tmp_path / "set"
    assert main(["calib", "build", str(source), "-o", str(out), "--count", "10", "--seed", "1"]) == 0
    m = json.loads((out / "calibration.json").read_text())
    assert m["count"] == 5 and m["requested_count"] == 10
    assert m["modalities"] == {"CT": 1, "MR": 1, "unknown": 3}
    assert m["skipped_unreadable"] == 1  # broken.dcm; notes.txt is a sidecar, not counted
    # The hash is over the sorted (file, pixel hash) list and matches the files on disk.
    samples = sorted(m["samples"], key=lambda s: s["file"])
    assert m["sha256"] == hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()
    for s in samples:
        rgb = np.asarray(Image.open(out / s["file"]).convert("RGB"))
        h = hashlib.sha256(f"{rgb.shape}|{rgb.dtype}|".encode())
        h.update(rgb.tobytes())
        assert h.hexdigest() == s["pixels_sha256"]
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [p["image"] for p in prompts] == [s["file"] for s in samples]
    assert all(p["prompt"] for p in prompts)
    assert sorted(p.name for p in out.iterdir()) == sorted(["calibration.json", "prompts.jsonl"]
                                                          + [s["file"] for s in samples])
    pairs = load_calibration_set(out)
    assert len(pairs) == 5 and all(im.mode == "RGB" and isinstance(p, str) for im, p in pairs)


def test_no_patient_identifier_reaches_the_set(source, tmp_path):
    out = tmp_path / "set"
    build_calibration_set(source, out, count=10)
    needles = _identifiers()
    assert {"CompressedSamples^CT1", "1CT1", "20040119"} <= needles  # the check checks something
    needles |= {FAKE_PNG_NAME, "Patient_Doe_John", "CT_small", "MR_small", "xray_", str(source)}
    for name, data in _all_bytes(out):
        for v in needles:
            assert v.encode() not in data, f"{v!r} found in {name}"
        if name.endswith(".png"):
            im = Image.open(out / name)
            assert not im.info.get("PatientName") and not getattr(im, "text", {})


def test_stratified_and_deterministic(source, tmp_path):
    a = build_calibration_set(source, tmp_path / "a", count=3, seed=5)
    b = build_calibration_set(source, tmp_path / "b", count=3, seed=5)
    assert a["modalities"] == {"CT": 1, "MR": 1, "unknown": 1}  # every modality before a second PNG
    assert a["sha256"] == b["sha256"] and a["prompts_sha256"] == b["prompts_sha256"]
    c = build_calibration_set(source, tmp_path / "c", count=3, seed=6)
    assert c["modalities"] == a["modalities"]


def test_prompts_file_binds_by_image_and_cycles_the_rest(source, tmp_path):
    pf = tmp_path / "prompts.jsonl"
    pf.write_text(json.dumps({"image": "ct/CT_small.dcm", "prompt": "Is the liver normal?", "answer": "yes"}) + "\n"
                  + json.dumps({"prompt": "Describe the image."}) + "\n")
    out = tmp_path / "set"
    assert main(["calib", "build", str(source), "-o", str(out), "--prompts", str(pf)]) == 0
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    ct = [p for p in prompts if p["image"].endswith("-ct.png")]
    assert ct == [{"image": ct[0]["image"], "prompt": "Is the liver normal?", "answer": "yes"}]
    assert all(p["prompt"] == "Describe the image." for p in prompts if p not in ct)


def test_empty_folder_exits_2_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "set"
    assert main(["calib", "build", str(empty), "-o", str(out)]) == 2
    assert "empty" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [empty]


def test_unreadable_only_folder_names_files(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "truncated.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (src / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert main(["calib", "build", str(src), "-o", str(tmp_path / "set")]) == 2
    msg = capsys.readouterr().err
    assert "no readable images" in msg and "truncated.dcm" in msg and "fake.png" in msg
    assert not (tmp_path / "set").exists()


def test_existing_output_refused(source, tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    assert main(["calib", "build", str(source), "-o", str(out)]) == 2
    assert list(out.iterdir()) == []
    with pytest.raises(BadInputError, match="no such folder"):
        build_calibration_set(tmp_path / "missing", tmp_path / "set2")


def test_synthetic_cxr_default_set_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    pairs = load_calibration_set(count=6)
    assert len(pairs) == 6 and all(im.size == (128, 128) for im, _ in pairs)
    assert all(p.endswith(("Answer yes or no.", "single word or phrase.")) for _, p in pairs)
    path = resolve_calibration_set("synthetic-cxr", count=6)
    assert path.parent == tmp_path / "home" / "calib"
    m = json.loads((path / "calibration.json").read_text())
    assert m["modalities"] == {"DX": 6} and "synthetic-cxr" in m["source"]
    stamp = (path / "calibration.json").stat().st_mtime_ns
    assert load_calibration_set("synthetic-cxr", count=6)[0][1] == pairs[0][1]
    assert (path / "calibration.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert load_calibration_set(path.name)[0][1] == pairs[0][1]  # a cached set by name
    with pytest.raises(BadInputError, match="no such set"):
        load_calibration_set("no-such-set")


def test_a_crafted_modality_never_reaches_an_output(tmp_path, capsys):
    """DICOM Modality is a code string a sending system fills as it likes; only DICOM's defined terms
    (PS3.3 C.7.3.1.1.1) may reach calibration.json, file names or stdout."""
    from edgemed.imaging import describe_medical_image

    src = tmp_path / "in"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality = "DOE JANE"
    ds.save_as(src / "crafted.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "MR_small.dcm")
    assert describe_medical_image(src / "crafted.dcm")["modality"] == "unknown"
    assert describe_medical_image(src / "MR_small.dcm")["modality"] == "MR"
    out = tmp_path / "set"
    assert main(["calib", "build", str(src), "-o", str(out), "--count", "2"]) == 0
    printed = capsys.readouterr()
    written = "".join(p.read_text(errors="replace") for p in out.iterdir() if p.suffix in (".json", ".jsonl"))
    names = " ".join(p.name for p in out.iterdir())
    for text in (printed.out, printed.err, written, names):
        assert "DOE" not in text and "JANE" not in text.upper()
    assert json.loads((out / "calibration.json").read_text())["modalities"] == {"MR": 1, "unknown": 1}
