"""synthetic-cxr: deterministic images, VQA-RAD-style records in the suite layout, synthetic DICOM."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from edgemed.bench.suites import load_suite
from edgemed.data.synthetic_cxr import FINDINGS, SITES, generate, image_spec, render
from edgemed.data.synthetic_dicom import DICOM_PATIENT_ID, DICOM_PATIENT_NAME
from edgemed.errors import BadInputError
from edgemed.imaging import load_medical_image

SPLITS = {"train": 0.5, "test": 0.25, "calib": 0.25}  # 20 images: 10 / 5 / 5


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scxr") / "suite"
    generate(out, 20, seed=7, size=64, splits=SPLITS, dicom=True)
    return out


def _records(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_pixels(suite, tmp_path):
    again = tmp_path / "again"
    generate(again, 20, seed=7, size=64, splits=SPLITS, dicom=True)
    assert _tree(again) == _tree(suite)  # PNG, DICOM, jsonl and dataset.json, byte for byte
    other = tmp_path / "other"
    generate(other, 20, seed=8, size=64, splits=SPLITS)
    a = np.asarray(Image.open(suite / "images/test/test-00000.png"))
    b = np.asarray(Image.open(other / "images/test/test-00000.png"))
    assert not np.array_equal(a, b)


def test_a_smaller_generation_is_a_prefix(suite, tmp_path):
    # What the calibration cache relies on: image j of a split depends on (seed, split, j) only.
    small = tmp_path / "small"
    generate(small, 3, seed=7, size=64, splits={"calib": 1.0})
    for j in range(3):
        name = f"images/calib/calib-{j:05d}.png"
        assert (small / name).read_bytes() == (suite / name).read_bytes()


def test_splits_are_disjoint_by_image(suite):
    info = json.loads((suite / "dataset.json").read_text())
    assert {k: v["images"] for k, v in info["splits"].items()} == {"train": 10, "test": 5, "calib": 5}
    ids, pixels = {}, {}
    for split in SPLITS:
        recs = _records(suite, split)
        ids[split] = {r["image_id"] for r in recs}
        assert all(r["image"].startswith(f"images/{split}/") for r in recs)
        pixels[split] = {hashlib.sha256(np.asarray(Image.open(suite / r["image"])).tobytes()).hexdigest()
                         for r in recs}
        assert len(pixels[split]) == len(ids[split]) == info["splits"][split]["images"]
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not ids[a] & ids[b] and not pixels[a] & pixels[b]


def test_every_finding_and_site_present_and_answers_well_formed(suite):
    for split in SPLITS:
        recs = _records(suite, split)
        assert {r["labels"]["finding"] for r in recs} == set(FINDINGS)  # each split of >= 5 images
        for r in recs:
            assert set(r) >= {"image", "question", "answer", "answer_type", "modality", "finding", "normal",
                              "subgroups"}
            assert (suite / r["image"]).is_file()
            assert r["subgroups"]["site"] in SITES
            if r["answer_type"] == "closed":
                assert r["answer"] in ("yes", "no")
            else:
                assert r["answer_type"] == "open" and r["answer"] not in ("yes", "no", "")
    train = _records(suite, "train")
    assert {r["subgroups"]["site"] for r in _records(suite, "test")} == set(SITES)
    closed = [r["answer"] for r in train if r["answer_type"] == "closed"]
    assert 0.3 < closed.count("yes") / len(closed) < 0.7  # no "always no" shortcut
    questions = {r["question"] for r in train}
    assert {"What is the abnormality?", "Is the heart enlarged?", "Is there a pleural effusion?"} <= questions
    assert any(q.startswith("Which side is the") for q in questions)


def test_normal_images_carry_hallucination_probes(suite):
    items = load_suite("synthetic-cxr", suite, split="test")
    assert len(items) == len(_records(suite, "test"))
    probes = [it for it in items if it.normal and it.finding]
    assert probes and all(it.answer == "no" and it.answer_type == "closed" for it in probes)
    assert all(it.subgroups["image_finding"] == "normal" for it in probes)
    # Abnormal images ask about their own finding too, so "yes" presence answers exist.
    assert any(it.finding and not it.normal and it.answer == "yes" for it in items)


def test_finding_is_drawn_on_the_patients_side():
    # PA view: the patient's right lung is on the image's left. A large effusion whitens that base.
    for j in range(2, 200, 5):
        spec = image_spec(0, "train", j)
        if spec.finding == "effusion" and spec.size == "large":
            break
    img = render(spec, 128, 0)
    base = img[80:92]
    image_left, image_right = base[:, 20:45].mean(), base[:, 83:108].mean()
    assert (image_left > image_right + 0.1) == (spec.laterality == "right")
    assert (image_right > image_left + 0.1) == (spec.laterality == "left")


def test_dicom_loads_and_is_obviously_synthetic(suite):
    recs = _records(suite, "test")
    seen_uids = set()
    for rel in sorted({r["dicom"] for r in recs}):
        path = suite / rel
        png = next(r["image"] for r in recs if r["dicom"] == rel)
        a = np.asarray(load_medical_image(path), dtype=int)
        b = np.asarray(Image.open(suite / png).convert("RGB"), dtype=int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == DICOM_PATIENT_NAME and ds.PatientID == DICOM_PATIENT_ID
        assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
        assert ds.PatientIdentityRemoved == "YES" and "Synthetic" in ds.ImageComments
        for elem in ds.iterall():
            if elem.VR in ("DA", "DT", "TM"):
                assert not elem.value, f"{elem.keyword} carries a date/time"
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert uid.startswith(pydicom.uid.PYDICOM_ROOT_UID)
        seen_uids.add(ds.SOPInstanceUID)
    assert len(seen_uids) == 5


def test_refuses_bad_arguments(tmp_path):
    with pytest.raises(BadInputError, match="positive integer"):
        generate(tmp_path / "a", 0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(BadInputError, match="not an empty folder"):
        generate(tmp_path / "full", 5)
    with pytest.raises(BadInputError, match="fewer images than splits"):
        generate(tmp_path / "b", 2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
