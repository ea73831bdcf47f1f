"""Folders that appear complete or not at all: written in a temporary sibling and renamed when done,
so a crash or an error never leaves a half-written artifact, model or data set behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

TMP_MARK = ".tmp-"  # temporary siblings are named .NAME.tmp-XXXXXXXX


@contextmanager
def atomic_directory(out: str | Path, *, exists: Literal["replace", "keep"] = "replace") -> Iterator[Path]:
    """`with atomic_directory(out) as tmp:` write into tmp; on success tmp becomes `out`, on any error
    it is removed. `exists`: what happens when `out` exists by then: replace it, or keep it and drop
    the new copy (another process built the same thing first). Checks that must refuse an existing
    `out` belong inside the block, where raising removes tmp."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}", dir=out.parent))
    try:
        yield tmp
        if out.exists() and exists == "replace":
            shutil.rmtree(out)
        if not out.exists():
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
