"""`synthetic-cxr`: procedurally generated chest radiographs with findings and VQA-RAD-style questions.

Why synthetic: real radiograph sets (VQA-RAD, SLAKE, MIMIC-CXR) cannot be downloaded on every
machine and carry patient data; a generator gives the demo model something to see, calibration
sets something medical-looking, and subgroup and hallucination reports something to measure,
offline and deterministically.

Each image is a frontal (PA) chest radiograph drawn with numpy only: body outline, lung fields,
ribs, clavicles, spine, mediastinum, heart shadow, hemidiaphragms and a gastric bubble, vessel
texture, then one finding (nodule, pleural effusion, cardiomegaly, pneumothorax, or none) and a
site/scanner look (contrast, gamma, noise, blur) plus per-image exposure variation. Brighter means
more attenuating, as on a MONOCHROME2 radiograph.

Laterality is the patient's: on a PA view the patient's right lung is on the image's left.

Layout written by :func:`generate` (what ``edgemed.bench.suites`` reads for ``synthetic-cxr``)::

    OUT/dataset.json                 generator version, seed, size, per-split counts
    OUT/{split}.jsonl                one question per line (see :func:`questions_for`)
    OUT/images/{split}/{id}.png      8-bit grayscale
    OUT/dicom/{split}/{id}.dcm       with dicom=True: 16-bit MONOCHROME2 DX, synthetic metadata

Image ``j`` of split ``s`` depends only on (seed, s, j, size), so a smaller generation is a prefix
of a larger one and no image can appear in two splits.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgemed.atomic import atomic_directory
from edgemed.data.synthetic_dicom import write_dicom
from edgemed.errors import BadInputError

__all__ = ["FINDINGS", "SITES", "GENERATOR_VERSION", "ImageSpec", "DEFAULT_SPLITS", "generate",
           "image_spec", "render", "questions_for", "split_counts", "to_uint8"]

#: Bumped whenever pixels or questions change, so caches keyed by it are rebuilt.
GENERATOR_VERSION = "1"

FINDINGS = ("normal", "nodule", "effusion", "cardiomegaly", "pneumothorax")
LATERAL_FINDINGS = ("nodule", "effusion", "pneumothorax")
SIDES = ("left", "right")
ZONES = ("upper", "middle", "lower")
SIZES = ("small", "medium", "large")

#: The words an answer uses for each finding (VQA-RAD's vocabulary).
FINDING_WORDS = {"nodule": "nodule", "effusion": "pleural effusion", "cardiomegaly": "cardiomegaly",
                 "pneumothorax": "pneumothorax"}

#: Site/scanner looks, applied after the anatomy is drawn. Values are for a 128-pixel image;
#: blur scales with the image size so the look is the same at any resolution.
SITES: dict[str, dict[str, float]] = {
    "A": {"contrast": 1.00, "gamma": 1.00, "noise": 0.012, "blur_px": 0.0, "offset": 0.00},
    "B": {"contrast": 0.80, "gamma": 1.35, "noise": 0.030, "blur_px": 0.8, "offset": 0.04},
    "C": {"contrast": 1.15, "gamma": 0.80, "noise": 0.050, "blur_px": 1.3, "offset": -0.03},
}

DEFAULT_SPLITS: dict[str, float] = {"train": 0.8, "test": 0.1, "calib": 0.1}
MODALITY = "cxr"  # the record's modality (the suite's subgroup key); DICOM files say "DX"


@dataclass(frozen=True)
class ImageSpec:
    """What one image shows; everything its pixels and questions are drawn from."""

    id: str
    split: str
    index: int
    finding: str
    laterality: str | None  # the patient's side
    zone: str | None
    size: str | None
    site: str

    @property
    def normal(self) -> bool:
        return self.finding == "normal"


# --------------------------------------------------------------------------------------------
# specs


def rng_for(seed: int, split: str, index: int, purpose: str) -> np.random.Generator:
    # Stable across processes and numpy versions: the entropy is a hash of the names, not hash().
    digest = hashlib.sha256(f"synthetic-cxr/{GENERATOR_VERSION}/{seed}/{split}/{index}/{purpose}".encode()).digest()
    return np.random.default_rng(np.frombuffer(digest[:16], dtype=np.uint32))


def image_spec(seed: int, split: str, index: int) -> ImageSpec:
    """The finding cycles with the index (period 5) and the site too (period 3), so any 5 images in a
    row hold every finding, any 3 every site, and any 15 each finding at each site once (5 and 3
    are coprime); side, zone and size are drawn from the image's own seed."""
    finding = FINDINGS[index % len(FINDINGS)]
    site = tuple(SITES)[index % len(SITES)]
    rng = rng_for(seed, split, index, "spec")
    side, zone, size = rng.choice(SIDES), rng.choice(ZONES), rng.choice(SIZES)
    laterality = str(side) if finding in LATERAL_FINDINGS else None
    if finding == "nodule":
        z = str(zone)
    elif finding == "effusion":
        z = "lower"  # fluid lies at the base on an erect film
    elif finding == "pneumothorax":
        z = "upper"  # air rises to the apex
    else:
        z = None
    return ImageSpec(id=f"{split}-{index:05d}", split=split, index=index, finding=finding,
                     laterality=laterality, zone=z, size=None if finding == "normal" else str(size), site=site)


# --------------------------------------------------------------------------------------------
# rendering


def _gauss_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected edges (numpy only)."""
    if sigma <= 0.05:
        return img
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    out = img
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            acc += w * (p[i:i + n, :] if axis == 0 else p[:, i:i + n])
        out = acc
    return out


def _smooth_noise(rng: np.random.Generator, n: int, sigma_px: float) -> np.ndarray:
    x = _blur(rng.standard_normal((n, n)), sigma_px)
    return x / (x.std() + 1e-12)


def _soft(mask_dist: np.ndarray, edge: float) -> np.ndarray:
    """A soft 0..1 mask from a signed distance-like field (positive inside)."""
    return 1.0 / (1.0 + np.exp(-np.clip(mask_dist / edge, -40, 40)))


def render(spec: ImageSpec, size: int = 128, seed: int = 0) -> np.ndarray:
    """The image as float64 in [0, 1], shape (size, size); brighter = more attenuating."""
    n = int(size)
    rng = rng_for(seed, spec.split, spec.index, "pixels")
    scale = n / 128.0
    edge = 1.2 / n  # soft edges about one pixel wide
    v, u = np.mgrid[0:n, 0:n].astype(np.float64) / (n - 1)

    # Anatomy varies a little between "patients".
    jit = lambda s: float(rng.normal(0.0, s))  # noqa: E731
    mid = 0.5 + jit(0.008)
    lung_cu = {"right": 0.31 + jit(0.01), "left": 0.69 + jit(0.01)}  # image columns (patient right = image left)
    lung_ru = 0.155 + jit(0.008)
    lung_cv, lung_rv = 0.49 + jit(0.01), 0.33 + jit(0.01)
    dome_base = {"right": 0.71 + jit(0.01), "left": 0.745 + jit(0.01)}

    # Body and neck: soft tissue against air.
    body = 1.0 - ((u - mid) / 0.47) ** 2 - ((v - 0.62) / 0.66) ** 2
    neck = 0.09 - np.abs(u - mid)
    tissue = np.maximum(_soft(body, 0.01), _soft(neck, 0.01) * (v < 0.2))
    img = 0.04 + 0.40 * tissue + 0.06 * tissue * (np.abs(u - mid) / 0.47)  # thicker tissue laterally

    # Lungs, cut by the mediastinum and the domes of the hemidiaphragms.
    lung = np.zeros_like(img)
    lung_of: dict[str, np.ndarray] = {}
    for side, cu in lung_cu.items():
        ell = 1.0 - ((u - cu) / lung_ru) ** 2 - ((v - lung_cv) / lung_rv) ** 2
        dome = dome_base[side] + 0.09 * ((u - cu) / lung_ru) ** 2
        medial = (mid - 0.06 - u) if side == "right" else (u - mid - 0.06)
        m = _soft(ell, 0.03) * _soft(dome - v, edge) * _soft(medial, edge)
        lung_of[side] = m
        lung = np.maximum(lung, m)

    # Vessel markings: smooth texture, denser towards the hila.
    texture = _smooth_noise(rng, n, 1.6 * scale)
    hilum_d = np.minimum(np.hypot(u - (mid - 0.1), v - 0.45), np.hypot(u - (mid + 0.1), v - 0.45))
    vessels = 0.035 * texture + 0.10 * np.exp(-((hilum_d / 0.09) ** 2))

    # Pneumothorax: the lung collapses towards its base and hilum; the rim holds air without markings.
    ptx = np.zeros_like(img)
    if spec.finding == "pneumothorax":
        side = spec.laterality
        cu = lung_cu[side]
        shrink = {"small": 0.86, "medium": 0.74, "large": 0.60}[spec.size]
        anchor_u, anchor_v = cu + (0.06 if side == "right" else -0.06), dome_base[side]  # medial base
        uu, vv = anchor_u + (u - anchor_u) / shrink, anchor_v + (v - anchor_v) / shrink
        ell = 1.0 - ((uu - cu) / lung_ru) ** 2 - ((vv - lung_cv) / lung_rv) ** 2
        collapsed = _soft(ell, 0.03) * lung_of[side]
        ptx = np.clip(lung_of[side] - collapsed, 0.0, 1.0)
        pleural_line = np.exp(-((ell / 0.05) ** 2)) * lung_of[side]  # the visceral pleura, now visible
        vessels = vessels * (1.0 - ptx)
        img += 0.16 * pleural_line

    lung_level = 0.13 + vessels
    img = img * (1 - lung) + lung * (lung_level - 0.10 * ptx)

    # Ribs: posterior arcs over each hemithorax (curving down laterally), then clavicles.
    ribs = np.zeros_like(img)
    for side, cu in lung_cu.items():
        half = _soft(mid - u if side == "right" else u - mid, edge)
        lat = np.abs(u - mid) / 0.4
        for k in range(10):
            centre = 0.17 + 0.062 * k + 0.09 * lat ** 2 - 0.03 * lat
            ribs += half * np.exp(-(((v - centre) / (0.011 * (1 + 0.02 * k))) ** 2))
    for sgn in (-1, 1):
        du = (u - mid) * sgn
        clav = 0.12 + 0.10 * (du - 0.12) ** 2 * 4
        ribs += 1.3 * (du > 0.03) * (du < 0.32) * np.exp(-(((v - clav) / 0.012) ** 2))
    img += 0.09 * np.clip(ribs, 0, 1.5) * tissue

    # Mediastinum and spine with vertebral end plates.
    medi = _soft(0.065 - np.abs(u - mid), edge) * _soft(v - 0.1, 0.01) * tissue
    img = img * (1 - medi) + medi * 0.60
    spine = _soft(0.032 - np.abs(u - mid), edge) * tissue
    plates = 0.04 * (np.sin(v * 2 * np.pi * 13.0) > 0.75)
    img += spine * (0.08 + plates)

    # Heart: over the left hemithorax; enlarged past half the thoracic width in cardiomegaly.
    heart_ru = 0.15 + jit(0.006)
    if spec.finding == "cardiomegaly":
        heart_ru = {"small": 0.21, "medium": 0.235, "large": 0.26}[spec.size]
    heart_rv = 0.13 + 0.3 * (heart_ru - 0.15)
    heart_cu, heart_cv = mid + 0.045 + 0.3 * (heart_ru - 0.15), dome_base["left"] - heart_rv * 0.45
    heart = _soft(1.0 - ((u - heart_cu) / heart_ru) ** 2 - ((v - heart_cv) / heart_rv) ** 2, 0.08)
    heart *= _soft(dome_base["left"] + 0.02 - v, 0.01)
    img = img * (1 - heart) + heart * 0.57

    # Below the diaphragm: liver (image left) and a gastric bubble under the left dome.
    below = np.zeros_like(img)
    for side, cu in lung_cu.items():
        dome = dome_base[side] + 0.09 * ((u - cu) / lung_ru) ** 2
        half = _soft(mid - u if side == "right" else u - mid, edge)
        below = np.maximum(below, half * _soft(v - dome, edge))
    below *= tissue
    img = img * (1 - below) + below * 0.55
    bubble = _soft(1.0 - ((u - lung_cu["left"] - 0.02) / 0.05) ** 2
                   - ((v - dome_base["left"] - 0.07) / 0.03) ** 2, 0.05) * below
    img -= 0.25 * bubble

    # Findings drawn into the lung.
    if spec.finding == "nodule":
        cu = lung_cu[spec.laterality] + (0.02 if spec.laterality == "left" else -0.02) + jit(0.015)
        cv = {"upper": 0.30, "middle": 0.45, "lower": 0.60}[spec.zone] + jit(0.015)
        r = {"small": 0.022, "medium": 0.032, "large": 0.046}[spec.size]
        d = np.hypot(u - cu, v - cv) / r
        img += 0.33 * np.exp(-(d ** 4)) * lung_of[spec.laterality].clip(0.5, 1)
    elif spec.finding == "effusion":
        side = spec.laterality
        cu = lung_cu[side]
        height = {"small": 0.07, "medium": 0.14, "large": 0.24}[spec.size] + jit(0.01)
        lateral = np.clip(((u - cu) if side == "left" else (cu - u)) / lung_ru * 0.5 + 0.5, 0, 1)
        level = dome_base[side] - height - 0.07 * lateral  # the meniscus climbs the lateral wall
        fluid = _soft(v - level, 0.012) * np.maximum(lung_of[side], _soft(v - dome_base[side], 0.01)
                                                       * _soft(0.17 - np.abs(u - cu), 0.01)) * tissue
        img = img * (1 - fluid) + fluid * (0.50 + 0.1 * vessels)

    # Site/scanner look and per-image exposure.
    look = SITES[spec.site]
    img = _blur(img, look["blur_px"] * scale)
    gain = look["contrast"] * float(np.exp(rng.normal(0.0, 0.06)))
    offset = look["offset"] + float(rng.normal(0.0, 0.025))
    img = np.clip((img - 0.35) * gain + 0.35 + offset, 0.0, 1.0) ** look["gamma"]
    img = img + look["noise"] * rng.standard_normal(img.shape) + 0.01 * _smooth_noise(rng, n, 6 * scale)
    return np.clip(img, 0.0, 1.0)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# questions


def presence_question(finding: str, side: str | None = None) -> str:
    if finding == "effusion":
        return "Is there a pleural effusion?" if side is None else f"Is there a pleural effusion on the {side}?"
    if finding == "cardiomegaly":
        return "Is the heart enlarged?"
    if finding == "nodule":
        return "Is there a nodule?" if side is None else f"Is there a nodule in the {side} lung?"
    if finding == "pneumothorax":
        return "Is there a pneumothorax?" if side is None else f"Is there a pneumothorax on the {side}?"
    raise ValueError(finding)


def questions_for(spec: ImageSpec, seed: int = 0) -> list[dict[str, Any]]:
    """VQA-RAD-style questions about one image, as suite records (image path added by the writer).

    ``finding`` is set on finding-presence questions (the finding asked about) and on
    "Is there an abnormality?"; ``normal`` says whether the image is normal. A presence question
    asked of a normal image is a hallucination probe: its answer is always "no".
    Abnormal images get their own finding (yes) and another one (no), so yes and no are near
    balanced; normal images get two absent findings.
    """
    rng = rng_for(seed, spec.split, spec.index, "questions")
    abnormal = [f for f in FINDINGS if f != "normal"]
    qs: list[tuple[str, str, str, str | None]] = []  # question, answer, type, finding asked about
    if spec.normal:
        for f in rng.choice(abnormal, size=2, replace=False):
            qs.append((presence_question(str(f)), "no", "closed", str(f)))
    else:
        other = str(rng.choice([f for f in abnormal if f != spec.finding]))
        qs.append((presence_question(spec.finding), "yes", "closed", spec.finding))
        qs.append((presence_question(other), "no", "closed", other))
        if spec.laterality is not None:
            asked = spec.laterality if rng.random() < 0.5 else ("left" if spec.laterality == "right" else "right")
            qs.append((presence_question(spec.finding, asked), "yes" if asked == spec.laterality else "no",
                       "closed", spec.finding))
    if rng.random() < 0.5:
        qs.append(("Is this chest radiograph normal?", "yes" if spec.normal else "no", "closed", None))
    else:
        qs.append(("Is there an abnormality?", "no" if spec.normal else "yes", "closed", "abnormality"))
    qs.append(("What is the abnormality?", "none" if spec.normal else FINDING_WORDS[spec.finding], "open", None))
    if spec.laterality is not None:
        qs.append((f"Which side is the {FINDING_WORDS[spec.finding]} on?", spec.laterality, "open", None))
    if spec.finding == "nodule":
        qs.append(("In which lung zone is the nodule?", spec.zone, "open", None))
    if spec.finding in ("nodule", "effusion"):
        qs.append((f"How large is the {FINDING_WORDS[spec.finding]}?", spec.size, "open", None))
    out = []
    for j, (q, a, kind, f) in enumerate(qs):
        out.append({
            "id": f"synthetic-cxr-{spec.id}-q{j}", "image_id": spec.id, "question": q, "answer": a,
            "answer_type": kind, "modality": MODALITY, "finding": f, "normal": spec.normal,
            "subgroups": {"site": spec.site, "image_finding": spec.finding},
            "labels": {"finding": spec.finding, "laterality": spec.laterality, "zone": spec.zone,
                       "size": spec.size, "site": spec.site},
        })
    return out


# --------------------------------------------------------------------------------------------
# writing a suite


def split_counts(n_images: int, splits: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder allocation of n_images over the split fractions; every split with a
    positive fraction gets at least one image when there are enough images."""
    if not splits:
        raise BadInputError("splits", "no splits given", "pass e.g. {'train': 0.8, 'test': 0.1, 'calib': 0.1}")
    for name, frac in splits.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
            raise BadInputError(f"split name {name!r}", "must be letters, digits, '-' or '_'", "rename the split")
        if not np.isfinite(frac) or frac < 0:
            raise BadInputError(f"split {name}={frac!r}", "fractions must be finite and >= 0", "use e.g. 0.1")
    total = float(sum(splits.values()))
    if total <= 0:
        raise BadInputError("splits", "fractions sum to zero", "give at least one split a positive fraction")
    positive = [k for k, f in splits.items() if f > 0]
    if n_images < len(positive):
        raise BadInputError(f"n_images={n_images}", f"fewer images than splits ({len(positive)})",
                            f"generate at least {len(positive)} images")
    raw = {k: n_images * f / total for k, f in splits.items()}
    counts = {k: int(np.floor(x)) for k, x in raw.items()}
    for k in sorted(raw, key=lambda k: (counts[k] - raw[k], list(raw).index(k)))[: n_images - sum(counts.values())]:
        counts[k] += 1
    for k in positive:  # steal from the largest split so tiny splits are not empty
        while counts[k] == 0:
            donor = max(counts, key=counts.get)
            counts[donor] -= 1
            counts[k] += 1
    return counts


def generate(out_dir: str | os.PathLike[str], n_images: int, seed: int = 0, *, size: int = 128,
             splits: Mapping[str, float] | None = None, dicom: bool = False,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the `synthetic-cxr` suite (PNGs, optional DICOMs, ``{split}.jsonl``, ``dataset.json``)
    into ``out_dir`` (new, or an empty folder) and return what ``dataset.json`` holds.

    The folder is written beside its destination and renamed into place when complete.
    """
    out = Path(out_dir)
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise BadInputError(f"n_images={n_images!r}", "must be a positive integer", "pass e.g. 200")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 32 <= size <= 2048:
        raise BadInputError(f"size={size!r}", "must be an integer from 32 to 2048 pixels", "use 128 (default) or 224")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(str(out), "already exists and is not an empty folder",
                            "choose a new output folder or remove this one")
    counts = split_counts(int(n_images), dict(splits or DEFAULT_SPLITS))
    with atomic_directory(out) as tmp:  # replaces the empty folder checked above
        summary: dict[str, Any] = {
            "name": "synthetic-cxr", "generator_version": GENERATOR_VERSION, "seed": int(seed), "size": int(size),
            "findings": list(FINDINGS), "sites": SITES, "modality": MODALITY, "dicom": bool(dicom),
            "laterality": "the patient's side; on these PA views the patient's right is the image's left",
            "splits": {},
        }
        for split, count in counts.items():
            (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
            if dicom:
                (tmp / "dicom" / split).mkdir(parents=True, exist_ok=True)
            n_q = 0
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for j in range(count):
                    spec = image_spec(seed, split, j)
                    img = render(spec, size, seed)
                    rel = f"images/{split}/{spec.id}.png"
                    Image.fromarray(to_uint8(img), mode="L").save(tmp / rel, optimize=False)
                    extra = {}
                    if dicom:
                        rel_dcm = f"dicom/{split}/{spec.id}.dcm"
                        write_dicom(tmp / rel_dcm, img, spec, seed, GENERATOR_VERSION)
                        extra["dicom"] = rel_dcm
                    for rec in questions_for(spec, seed):
                        fh.write(json.dumps({"image": rel, **extra, **rec}, sort_keys=True) + "\n")
                        n_q += 1
                    if progress and j % 50 == 0:
                        progress(f"synthetic-cxr {split}: image {j + 1}/{count}")
            summary["splits"][split] = {"images": count, "questions": n_q}
        (tmp / "dataset.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


if __name__ == "__main__":  # python -m edgemed.data.synthetic_cxr OUT [N] [SEED]
    import sys

    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m edgemed.data.synthetic_cxr OUT [N_IMAGES=200] [SEED=0]")
    info = generate(args[0], int(args[1]) if len(args) > 1 else 200, int(args[2]) if len(args) > 2 else 0)
    print(json.dumps(info["splits"]))
