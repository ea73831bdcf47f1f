"""Artifact directories: written to a temporary sibling, renamed when complete, described by
manifest.json (a typed Manifest: DESIGN.md's minimum fields and more) and verifiable by sha256.
Torch-free."""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgemed._version import __version__
from edgemed.atomic import WRITER_FILE, atomic_directory, remove_stale_siblings
from edgemed.errors import BadInputError, VerificationError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


class FileRecord(BaseModel):
    """One file of the artifact: what it holds, in which format and precision."""

    model_config = ConfigDict(extra="allow")
    path: str
    sha256: str
    bytes: int
    component: str | None = None
    format: str | None = None
    precision: str | None = None


class SourceFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: str
    sha256: str
    bytes: int


class SourceRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    family: str | None = None
    revision_or_path: str | None = None
    files: list[SourceFile] = Field(default_factory=list)


class ModelRecord(BaseModel):
    """The facts the runtime needs without torch: TextFacts and ImageFacts (edgemed.models) as dicts,
    the chat template, parameters per component."""

    model_config = ConfigDict(extra="allow")
    family: str | None = None
    text: dict[str, Any]
    image: dict[str, Any] | None = None
    chat_template: str | None = None
    component_params: dict[str, int] = Field(default_factory=dict)


class Manifest(BaseModel):
    """manifest.json. The field order is the file's key order; fields this version does not know are
    kept (extra="allow") so reading and writing an artifact never drops what another wrote."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = SCHEMA_VERSION
    created_utc: str = Field(default_factory=lambda: utc_now())
    edgemed_version: str = __version__
    format: str | None = None
    source: SourceRecord | None = None
    recipe: dict[str, Any] = Field(default_factory=dict)  # the resolved recipe, every default filled in
    target: dict[str, Any] | None = None  # the resolved target
    calibration: dict[str, Any] | None = None
    tools: dict[str, str | None] = Field(default_factory=dict)
    model: ModelRecord | None = None  # always set in an artifact; None for a bare session (bench)
    plan: dict[str, Any] | None = None
    runtime: dict[str, Any] = Field(default_factory=dict)  # how a session must drive the artifact
    files: list[FileRecord] = Field(default_factory=list)
    parity: dict[str, Any] | None = None
    results: dict[str, Any] | None = None
    status: str = "ok"  # ok | rejected
    status_reason: str | None = None
    notes: list[str] = Field(default_factory=list)
    gate_suite: dict[str, Any] | None = None

    def file(self, path: str) -> FileRecord | None:
        return next((f for f in self.files if f.path == path), None)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ArtifactWriter:
    """`with ArtifactWriter(out) as tmp:` write into tmp; on success tmp is renamed to out, on any
    error it is removed, so no half-written artifact is ever left behind (edgemed.atomic)."""

    def __init__(self, output: str | Path, overwrite: bool = False):
        self.output = Path(output).resolve()
        self.overwrite = overwrite
        if self.output.exists() and not overwrite:
            raise BadInputError(str(output), "output directory already exists",
                                "choose a new --output, or pass --overwrite to replace it")
        if self.output.exists() or self.output.is_symlink():
            _check_replaceable(self.output, str(output))
        if not self.output.parent.exists():
            raise BadInputError(str(output), f"parent folder {self.output.parent} does not exist", "create it first")
        # Folders of runs into the same output that were killed (SIGKILL, power cut) go now.
        self.removed_stale = remove_stale_siblings(self.output)
        self._atomic = atomic_directory(self.output)

    def __enter__(self) -> Path:
        return self._atomic.__enter__()

    def __exit__(self, exc_type, exc, tb):
        self._atomic.__exit__(exc_type, exc, tb)
        return False


def _check_replaceable(path: Path, what: str) -> None:
    """--overwrite replaces an edgemed artifact (or an empty folder), never a file, a link or a folder
    of something else: the user's files are not ours to delete."""
    if path.is_symlink() or not path.is_dir():
        raise BadInputError(what, "exists and is not a folder", "choose another --output (--overwrite replaces only "
                            "an artifact folder)")
    if not any(path.iterdir()):
        return
    try:
        ours = {"schema_version", "edgemed_version", "files"} <= set(json.loads((path / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise BadInputError(what, "is a folder, but not an edgemed artifact (no edgemed manifest.json)",
                            "choose another --output; --overwrite never deletes a folder edgemed did not write")


def file_records(root: Path, describe: dict[str, dict[str, Any]] | None = None) -> list[FileRecord]:
    """Every file under root except the manifest, with sha256, size and what it is."""
    describe = describe or {}
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == MANIFEST or p.relative_to(root).as_posix() == WRITER_FILE:
            continue
        rel = p.relative_to(root).as_posix()
        rec = {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size}
        rec.update(describe.get(rel, {"component": "support", "format": p.suffix.lstrip(".") or "file",
                                      "precision": None}))
        out.append(FileRecord(**rec))
    return out


def write_manifest(root: Path, manifest: Manifest) -> None:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False, default=str))
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: str | Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise BadInputError(str(root), "not an artifact directory", "pass the --output folder of `edgemed compress`")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(str(root), "no manifest.json in this folder", "pass a folder written by `edgemed compress`") from None
    except json.JSONDecodeError as e:
        raise BadInputError(str(path), f"manifest is not valid JSON ({e.msg} at line {e.lineno})",
                            "the artifact is damaged: re-run `edgemed compress`") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        version = data.get("schema_version") if isinstance(data, dict) else None
        raise BadInputError(str(path), f"manifest schema_version {version} is not {SCHEMA_VERSION}",
                            "re-create the artifact with this edgemed version")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise BadInputError(str(path), f"manifest field {where}: {first['msg']}",
                            "the artifact is damaged: re-run `edgemed compress`") from None


def contained_path(root: Path, rel: str, what: str) -> Path:
    """`root / rel` for a path an artifact names (a manifest entry, an ONNX external-data location),
    refused unless it is relative, normalised and stays inside `root` with no symlink on the way:
    an artifact is a trust boundary, never a way to read files elsewhere on the clinic's machine."""
    pure = PurePosixPath(rel)
    if (not rel or "\\" in rel or pure.is_absolute() or PureWindowsPath(rel).drive
            or any(part in ("", ".", "..") for part in rel.split("/")) or pure.as_posix() != rel):
        raise BadInputError(f"{root}: {what} '{rel}'", "is not a relative, normalised path inside the artifact",
                            "the artifact was tampered with or damaged: re-run `edgemed compress`")
    path = root / rel
    for step in [*reversed(path.relative_to(root).parents), path.relative_to(root)]:
        if step != Path(".") and (root / step).is_symlink():
            raise BadInputError(f"{root}: {what} '{rel}'", f"goes through a symbolic link ({step})",
                                "copy the artifact with real files (cp -rL, or re-run `edgemed compress`)")
    if not path.resolve().is_relative_to(root.resolve()):  # pragma: no cover - the checks above imply it
        raise BadInputError(f"{root}: {what} '{rel}'", "resolves outside the artifact", "re-run `edgemed compress`")
    return path


def verify(root: str | Path, manifest: Manifest | None = None, *, hashes: bool = True) -> list[str]:
    """Check every listed file against the manifest: its path stays inside the artifact (no
    symlinks anywhere in it), its size, and with `hashes` its sha256; and no file is unlisted.
    Returns the problems (empty = intact); a path leaving the artifact raises BadInputError."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    problems = []
    listed = set()
    for rec in manifest.files:
        p = contained_path(root, rec.path, "manifest entry")
        listed.add(rec.path)
        if not p.is_file():
            problems.append(f"{rec.path}: missing")
            continue
        if p.stat().st_size != rec.bytes:
            problems.append(f"{rec.path}: size {p.stat().st_size} != {rec.bytes} in the manifest (truncated or replaced)")
        elif hashes and sha256_file(p) != rec.sha256:
            problems.append(f"{rec.path}: sha256 differs from the manifest (file changed or corrupt)")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                problems.append(f"{rel}: a symbolic link (an artifact holds real files only)")
            elif name in filenames and rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: not listed in the manifest")
    return problems


def verify_or_raise(root: str | Path, manifest: Manifest | None = None, *, hashes: bool = True) -> None:
    problems = verify(root, manifest, hashes=hashes)
    if problems:
        raise VerificationError(str(root), "artifact verification failed:\n  " + "\n  ".join(problems),
                                "re-run `edgemed compress` (the files no longer match manifest.json)")
