"""Calibration sets: the medical images (and prompts) that quantizers and imatrix passes see.

A set is a folder::

    SET/calibration.json   manifest: source (a description), count, modalities, sha256, ...
    SET/prompts.jsonl      {"image": "0000-ct.png", "prompt": ..., "answer": ...} per line, in file order
    SET/0000-ct.png ...    the selected images, re-encoded from pixels only

Why re-encode: a DICOM header (and a PNG's text chunks) can hold names, IDs and dates; a set is
copied into artifacts and shared, so only decoded pixels survive, under names edgemed makes up.
The source path and file names never reach the set either (a folder is often named after a
patient); the manifest describes the source by kind and counts. Pixels themselves can show
burned-in text, so DICOMs that declare BurnedInAnnotation YES are skipped.

Recipes name a set by path, by the name of a set under ``<cache>/calib/``, or ``synthetic-cxr``
(the default): the calibration split of edgemed's synthetic radiographs, generated once and cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgemed.atomic import atomic_directory
from edgemed.errors import BadInputError, EdgemedError

__all__ = ["DEFAULT_COUNT", "DEFAULT_SET", "build_calibration_set", "load_calibration_set",
           "resolve_calibration_set", "default_prompt"]

log = logging.getLogger(__name__)

DEFAULT_SET = "synthetic-cxr"
DEFAULT_COUNT = 64
MANIFEST = "calibration.json"
PROMPTS = "prompts.jsonl"
SCHEMA_VERSION = 1

# Files that sit beside images in a dataset folder and are not worth reporting as unreadable.
_SIDECAR_SUFFIXES = (".json", ".jsonl", ".txt", ".md", ".csv", ".tsv", ".yaml", ".yml", ".xml", ".html",
                     ".py", ".sh", ".zip", ".tar", ".gz")
_NIFTI = (".nii", ".nii.gz")

# Modality (DICOM code) -> what to ask when the user gives no prompts. Several per modality,
# cycled, so the language model sees more than one phrasing.
_DEFAULT_PROMPTS: dict[str, tuple[str, ...]] = {
    "CT": ("Describe the findings in this CT image.", "Is there an abnormality in this CT slice?",
           "Which organ is shown in this CT image?"),
    "MR": ("Describe the findings in this MRI.", "Is there an abnormality in this MR image?",
           "Which sequence and plane is this MRI?"),
    "DX": ("Describe the findings on this radiograph.", "Is there an abnormality on this x-ray?",
           "Which body part is shown in this radiograph?"),
    "CR": ("Describe the findings on this radiograph.", "Is there an abnormality on this x-ray?"),
    "US": ("Describe the findings in this ultrasound image.",),
    "MG": ("Describe the findings in this mammogram.",),
}
_GENERIC_PROMPTS = ("Describe the findings in this medical image.", "Is there an abnormality in this image?",
                    "What imaging modality is this?")


def default_prompt(modality: str, k: int) -> str:
    options = _DEFAULT_PROMPTS.get(modality.upper(), _GENERIC_PROMPTS)
    return options[k % len(options)]


@dataclass
class _Candidate:
    path: Path | None  # a file to read (None when pixels are given)
    modality: str
    key: str  # the source-relative path: matches --prompts records; never written to the set
    prompt: str | None = None
    answer: str | None = None


# --------------------------------------------------------------------------------------------
# sources


def _image_files(root: Path) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.name.lower().endswith(_SIDECAR_SUFFIXES) and not p.name.lower().endswith(_NIFTI):
            continue
        files.append(p)
    return files


def _burned_in(p: Path) -> bool:
    """True when a DICOM declares burned-in annotation (its pixels may show patient data)."""
    if not p.name.lower().endswith((".dcm", ".dicom")):
        with open(p, "rb") as fh:
            head = fh.read(132)
        if head[128:132] != b"DICM":
            return False
    import pydicom

    from edgemed.imaging import quiet_pydicom  # pydicom's own warnings quote element values

    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["BurnedInAnnotation"])
            return str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"
        except Exception:  # unreadable headers are refused by describe/load with a clear reason
            return False


def _folder_candidates(root: Path) -> tuple[list[_Candidate], list[tuple[str, str]], dict[str, int]]:
    """Readable images (by header) with their modality, the unreadable (name, reason) pairs, and
    the count per file format."""
    from edgemed.imaging import describe_medical_image

    if not root.exists():
        raise BadInputError(str(root), "no such folder",
                            "pass a folder of DICOM/NIfTI/PNG/JPEG images, or 'synthetic-cxr'")
    if not root.is_dir():
        raise BadInputError(str(root), "is a file, not a folder", "put the images in a folder and pass the folder")
    files = _image_files(root)
    if not files:
        raise BadInputError(str(root), "is empty: no image files found (hidden files and .json/.txt/.csv "
                            "sidecars are ignored)", "add DICOM (.dcm), NIfTI (.nii/.nii.gz) or PNG/JPEG images")
    cands: list[_Candidate] = []
    bad: list[tuple[str, str]] = []
    formats: dict[str, int] = {}
    for p in files:
        rel = p.relative_to(root).as_posix()
        try:
            info = describe_medical_image(p)
            if info["format"] == "dicom" and _burned_in(p):
                bad.append((rel, "DICOM declares burned-in annotation (its pixels may show patient data)"))
                continue
        except EdgemedError as e:
            bad.append((rel, getattr(e, "reason", None) or str(e).splitlines()[0]))
            continue
        except Exception as e:  # noqa: BLE001  a reader bug must not stop the scan; name the type only
            bad.append((rel, f"unreadable ({type(e).__name__})"))
            continue
        modality = (info.get("modality") or "unknown").strip() or "unknown"
        formats[info["format"]] = formats.get(info["format"], 0) + 1
        cands.append(_Candidate(path=p, modality=modality, key=rel))
    if not cands:
        shown = "; ".join(f"{name}: {reason}" for name, reason in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise BadInputError(str(root), f"holds no readable images: {len(bad)} file(s) refused, e.g. {shown}{more}",
                            "add DICOM (.dcm), NIfTI (.nii/.nii.gz) or PNG/JPEG images edgemed can read")
    return cands, bad, formats


def _synthetic_candidates(tmp: Path, count: int, seed: int) -> list[_Candidate]:
    """The first `count` images of the synthetic-cxr calib split, each with one of its questions
    rendered with the suite's pinned prompt template (what the model is asked at bench time)."""
    from edgemed.bench.suites import Item, render_prompt_for
    from edgemed.data.synthetic_cxr import rng_for, generate

    folder = tmp / "synthetic-cxr"
    generate(folder, count, seed, splits={"calib": 1.0})
    by_image: dict[str, list[dict]] = {}
    with open(folder / "calib.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            by_image.setdefault(rec["image"], []).append(rec)
    out = []
    for k, (image, recs) in enumerate(sorted(by_image.items())):
        rec = recs[int(rng_for(seed, "calib", k, "calibration-prompt").integers(len(recs)))]
        item = Item(id=rec["id"], question=rec["question"], answer=rec["answer"], answer_type=rec["answer_type"])
        out.append(_Candidate(path=folder / image, modality="DX", key=image,
                              prompt=render_prompt_for("synthetic-cxr", item), answer=rec["answer"]))
    return out


def _read_prompts(path: Path) -> tuple[dict[str, dict], list[dict]]:
    """--prompts FILE: .jsonl records {"prompt", optional "image" (source-relative path or file
    name), optional "answer"}, or plain text with one prompt per line. Returns (bound, pool)."""
    if not path.is_file():
        raise BadInputError(str(path), "no such prompts file",
                            "pass a .jsonl ({\"prompt\": ...} per line) or .txt file")
    bound: dict[str, dict] = {}
    pool: list[dict] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInputError(f"{path}:{n}", f"not valid JSON ({e.msg})", "one JSON object per line") from None
            if not isinstance(rec, dict) or not str(rec.get("prompt") or "").strip():
                raise BadInputError(f"{path}:{n}", "record has no 'prompt'",
                                    'write {"prompt": "...", "image": "optional/relative/path.dcm"}')
            entry = {"prompt": str(rec["prompt"]), "answer": rec.get("answer")}
            if rec.get("image"):
                bound[str(rec["image"]).replace("\\", "/")] = entry
            else:
                pool.append(entry)
    else:
        pool = [{"prompt": line.strip(), "answer": None} for line in text.splitlines() if line.strip()]
    if not bound and not pool:
        raise BadInputError(str(path), "holds no prompts",
                            "one prompt per line (.txt) or {\"prompt\": ...} per line (.jsonl)")
    return bound, pool


# --------------------------------------------------------------------------------------------
# selection


def _allocate(sizes: dict[str, int], count: int) -> dict[str, int]:
    """Proportional quotas (largest remainder), at least one per modality when count allows."""
    total = sum(sizes.values())
    if count >= total:
        return dict(sizes)
    raw = {m: count * s / total for m, s in sizes.items()}
    quota = {m: min(sizes[m], int(np.floor(x))) for m, x in raw.items()}
    if count >= len(sizes):
        for m in sizes:
            quota[m] = max(quota[m], 1)
    while sum(quota.values()) > count:  # the minimum of one pushed us over: trim where it hurts least
        pool = [k for k in quota if quota[k] > 1] or [k for k in quota if quota[k] > 0]
        m = max(pool, key=lambda k: (quota[k] - raw[k], quota[k], k))
        quota[m] -= 1
    for m in sorted(raw, key=lambda k: (quota[k] - raw[k], k)):
        if sum(quota.values()) >= count:
            break
        if quota[m] < sizes[m]:
            quota[m] += 1
    while sum(quota.values()) < count:  # only when remainders ran out against the size caps
        m = next(k for k in sorted(sizes) if quota[k] < sizes[k])
        quota[m] += 1
    return quota


def _pixel_sha256(rgb: np.ndarray) -> str:
    h = hashlib.sha256(f"{rgb.shape}|{rgb.dtype}|".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def _safe_modality(m: str) -> str:
    s = "".join(c if c.isalnum() else "-" for c in m.lower()).strip("-")
    return s[:16] or "unknown"


# --------------------------------------------------------------------------------------------
# public API


def build_calibration_set(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
                          count: int = DEFAULT_COUNT, seed: int = 0, prompts: str | os.PathLike[str] | None = None,
                          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build a calibration set at ``output`` (which must not exist) and return its manifest.

    ``source``: a folder of images (DICOM, NIfTI, PNG, JPEG, ... read by
    :func:`edgemed.imaging.load_medical_image`, searched recursively) or ``"synthetic-cxr"``.
    Up to ``count`` images are drawn, stratified by modality (DICOM Modality, else "unknown"),
    shuffled by ``seed``. ``prompts``: a .jsonl/.txt file (see :func:`_read_prompts`); without
    it, synthetic-cxr uses its own questions and folders a default prompt per modality.
    Files that cannot be read are skipped (counted in the manifest); none readable is an error.
    """
    from edgemed.imaging import load_medical_image

    say = progress or (lambda _m: None)
    out = Path(output)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise BadInputError(f"--count {count!r}", "must be a positive integer", "pass e.g. --count 64")
    if out.exists():
        raise BadInputError(str(out), "already exists", "choose a new output folder, or remove this one first")
    bound, pool = _read_prompts(Path(prompts)) if prompts is not None else ({}, [])
    work = Path(tempfile.mkdtemp(prefix=".edgemed-calib-"))
    try:
        if str(source) == DEFAULT_SET:
            say(f"generate {count} synthetic-cxr calibration images (seed {seed})")
            cands, bad = _synthetic_candidates(work, int(count), int(seed)), []
            from edgemed.data.synthetic_cxr import GENERATOR_VERSION

            described = f"synthetic-cxr calibration split (generator v{GENERATOR_VERSION}, seed {seed})"
        else:
            say(f"scan {source}")
            cands, bad, formats = _folder_candidates(Path(source))
            fmt = ", ".join(f"{k}: {v}" for k, v in sorted(formats.items()))
            described = f"folder of {len(cands)} readable image files ({fmt})"
        rng = np.random.default_rng(int(seed))
        by_mod: dict[str, list[_Candidate]] = {}
        for c in cands:
            by_mod.setdefault(c.modality, []).append(c)
        for m in by_mod:
            by_mod[m] = [by_mod[m][i] for i in rng.permutation(len(by_mod[m]))]
        quota = _allocate({m: len(v) for m, v in by_mod.items()}, int(count))

        # Load in quota order; a file whose header read but whose pixels do not is replaced by the
        # next one of the same modality, then (if that runs out) of any modality.
        chosen: list[tuple[_Candidate, Image.Image]] = []
        seen_pixels: set[str] = set()
        queues = {m: list(v) for m, v in sorted(by_mod.items())}

        def take(m: str) -> bool:
            while queues[m]:
                c = queues[m].pop(0)
                try:
                    img = load_medical_image(c.path)
                except EdgemedError as e:
                    bad.append((c.key, getattr(e, "reason", None) or "unreadable"))
                    continue
                digest = _pixel_sha256(np.asarray(img))
                if digest in seen_pixels:  # an exact duplicate calibrates nothing new
                    continue
                seen_pixels.add(digest)
                chosen.append((c, img))
                return True
            return False

        for m in sorted(quota):
            for _ in range(quota[m]):
                if not take(m):
                    break
            say(f"selected {sum(1 for c, _ in chosen if c.modality == m)} {m} image(s)")
        for m in sorted(queues):
            while len(chosen) < count and take(m):
                pass
        if not chosen:
            shown = "; ".join(f"{n}: {r}" for n, r in bad[:5])
            raise BadInputError(str(source), f"holds no readable images ({shown})",
                                "add DICOM/NIfTI/PNG/JPEG images edgemed can read")

        # Write beside the destination, rename when complete.
        with atomic_directory(out) as tmp:
            chosen.sort(key=lambda t: (t[0].modality, t[0].key))
            samples, lines, modalities = [], [], {}
            per_mod_k: dict[str, int] = {}
            for i, (c, img) in enumerate(chosen):
                name = f"{i:04d}-{_safe_modality(c.modality)}.png"
                arr = np.asarray(img)
                gray = arr.ndim == 3 and bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all())
                # Fresh image from the array: no text chunks, EXIF or ICC profile can ride along.
                Image.fromarray(np.ascontiguousarray(arr[..., 0] if gray else arr)).save(tmp / name)
                samples.append({"file": name, "pixels_sha256": _pixel_sha256(arr)})
                entry = bound.get(c.key) or bound.get(Path(c.key).name)
                if entry is None and pool:
                    entry = pool[i % len(pool)]
                if entry is None and c.prompt is not None:
                    entry = {"prompt": c.prompt, "answer": c.answer}
                if entry is None:
                    k = per_mod_k.get(c.modality, 0)
                    per_mod_k[c.modality] = k + 1
                    entry = {"prompt": default_prompt(c.modality, k), "answer": None}
                rec = {"image": name, "prompt": entry["prompt"]}
                if entry.get("answer") is not None:
                    rec["answer"] = str(entry["answer"])
                lines.append(json.dumps(rec, sort_keys=True))
                modalities[c.modality] = modalities.get(c.modality, 0) + 1
            prompts_text = "\n".join(lines) + "\n"
            (tmp / PROMPTS).write_text(prompts_text, encoding="utf-8")
            sample_list = sorted(samples, key=lambda s: s["file"])
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "source": described,
                "count": len(chosen),
                "requested_count": int(count),
                "seed": int(seed),
                "modalities": dict(sorted(modalities.items())),
                "skipped_unreadable": len(bad),
                "sha256": hashlib.sha256(json.dumps(sample_list, sort_keys=True).encode()).hexdigest(),
                "sha256_of": "the sorted list of {file, pixels_sha256} (RGB uint8 pixels); no patient data",
                "prompts_sha256": hashlib.sha256(prompts_text.encode()).hexdigest(),
                "prompts": "from --prompts" if prompts is not None else
                           ("synthetic-cxr questions" if str(source) == DEFAULT_SET else "default per modality"),
                "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "samples": sample_list,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            if out.exists():
                raise BadInputError(str(out), "appeared while the set was being built", "choose a new output folder")
        if bad:
            log.warning("calibration set %s: skipped %d unreadable file(s)", out, len(bad))
        say(f"wrote {len(chosen)} images to {out}")
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_calibration_set(name_or_path: str | os.PathLike[str] | None = None, *, count: int = DEFAULT_COUNT,
                            seed: int = 0, progress: Callable[[str], None] | None = None) -> Path:
    """The folder of a calibration set: a path, a set under ``<cache>/calib/``, or
    ``synthetic-cxr`` (default; built on first use and cached)."""
    from edgemed._resources import cache_dir

    name = str(name_or_path) if name_or_path is not None else DEFAULT_SET
    root = cache_dir() / "calib"
    if name == DEFAULT_SET:
        from edgemed.data.synthetic_cxr import GENERATOR_VERSION

        path = root / f"synthetic-cxr-v{GENERATOR_VERSION}-n{count}-s{seed}"
        if not (path / MANIFEST).is_file():
            try:
                build_calibration_set(DEFAULT_SET, path, count=count, seed=seed, progress=progress)
            except BadInputError:
                if not (path / MANIFEST).is_file():  # lost a race with another process: theirs is fine
                    raise
        return path
    for path in (Path(name).expanduser(), root / name):
        if (path / MANIFEST).is_file() and (path / PROMPTS).is_file():
            return path
    if Path(name).is_dir():
        raise BadInputError(name, f"is a folder but not a calibration set (no {MANIFEST})",
                            f"build one first: edgemed calib build {name} -o SET, then use SET")
    known = sorted(p.name for p in root.glob("*") if (p / MANIFEST).is_file()) if root.is_dir() else []
    raise BadInputError(f"calibration '{name}'", "no such set",
                        f"pass a folder written by `edgemed calib build`, '{DEFAULT_SET}'"
                        + (f", or one of: {', '.join(known)}" if known else ""))


def load_calibration_set(name_or_path: str | os.PathLike[str] | None = DEFAULT_SET, *, count: int = DEFAULT_COUNT,
                         seed: int = 0) -> list[tuple[Image.Image, str]]:
    """(RGB image, prompt) pairs of a calibration set, in the set's order."""
    path = resolve_calibration_set(name_or_path, count=count, seed=seed)
    out: list[tuple[Image.Image, str]] = []
    for n, line in enumerate((path / PROMPTS).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        file = path / rec["image"]
        if not file.is_file() or Path(rec["image"]).name != rec["image"]:
            raise BadInputError(f"{path / PROMPTS}:{n}", f"names a missing image '{rec['image']}'",
                                "rebuild the set with `edgemed calib build`")
        with Image.open(file) as im:
            out.append((im.convert("RGB"), str(rec["prompt"])))
    if not out:
        raise BadInputError(str(path), "calibration set is empty", "rebuild it with `edgemed calib build`")
    return out

