"""Artifact directories: written to a temporary sibling, renamed when complete, described by
manifest.json (DESIGN.md minimum fields) and verifiable by sha256. Torch-free."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgemed.errors import BadInputError, VerificationError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


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
    error it is removed, so no half-written artifact is ever left behind."""

    def __init__(self, output: str | Path, overwrite: bool = False):
        self.output = Path(output).resolve()
        self.overwrite = overwrite
        if self.output.exists() and not overwrite:
            raise BadInputError(str(output), "output directory already exists",
                                "choose a new --output, or pass --overwrite to replace it")
        if not self.output.parent.exists():
            raise BadInputError(str(output), f"parent folder {self.output.parent} does not exist", "create it first")
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.tmp-", dir=self.output.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.output.exists():
            shutil.rmtree(self.output)
        os.replace(self.tmp, self.output)
        return False


def file_records(root: Path, describe: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every file under root except the manifest, with sha256, size and what it is."""
    describe = describe or {}
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == MANIFEST:
            continue
        rel = p.relative_to(root).as_posix()
        rec = {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size}
        rec.update(describe.get(rel, {"component": "support", "format": p.suffix.lstrip(".") or "file",
                                      "precision": None}))
        out.append(rec)
    return out


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str))
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: str | Path) -> dict[str, Any]:
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
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BadInputError(str(path), f"manifest schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}",
                            "re-create the artifact with this edgemed version")
    return data


def verify(root: str | Path) -> list[str]:
    """Recompute every listed file's sha256; returns the list of problems (empty = intact)."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    listed = set()
    for rec in manifest.get("files", []):
        p = root / rec["path"]
        listed.add(rec["path"])
        if not p.is_file():
            problems.append(f"{rec['path']}: missing")
            continue
        if p.stat().st_size != rec["bytes"]:
            problems.append(f"{rec['path']}: size {p.stat().st_size} != {rec['bytes']} in the manifest")
        elif sha256_file(p) != rec["sha256"]:
            problems.append(f"{rec['path']}: sha256 differs from the manifest (file changed or corrupt)")
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and p.name != MANIFEST and rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems


def verify_or_raise(root: str | Path) -> None:
    problems = verify(root)
    if problems:
        raise VerificationError(f"{root}: artifact verification failed:\n  " + "\n  ".join(problems))


def set_status(root: Path, status: str, reason: str | None = None, results: dict | None = None) -> None:
    """Update status/results in place (the manifest is not among the hashed files)."""
    m = read_manifest(root)
    m["status"] = status
    m["status_reason"] = reason
    if results is not None:
        m["results"] = results
    write_manifest(root, m)
