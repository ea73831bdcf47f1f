"""Folders that appear complete or not at all: written in a temporary sibling and renamed when done,
so a crash or an error never leaves a half-written artifact, model or data set behind.

A temporary sibling is named `.NAME.tmp-XXXXXXXX` and holds a marker naming the host and process
writing it while it is being written; `stale_siblings` finds those whose process is gone (a run
killed with SIGKILL, a power cut), so the next run into the same folder removes them. The marker is
removed before the rename: a complete folder never holds it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

TMP_MARK = ".tmp-"  # temporary siblings are named .NAME.tmp-XXXXXXXX
OLD_MARK = ".old-"  # a replaced folder, kept until its replacement is in place (then removed)
WRITER_FILE = ".edgemed-writing"
# A sibling without a readable marker (killed between mkdtemp and writing it) counts as stale after this.
UNMARKED_STALE_S = 600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_siblings(out: str | Path) -> list[Path]:
    """Temporary siblings of `out` left by runs that died (on this host; a folder another host is
    writing on shared storage is left alone)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    stale = []
    prefix = f".{out.name}{TMP_MARK}"
    for p in sorted(out.parent.iterdir()):
        if not p.name.startswith(prefix) or not p.is_dir() or p.is_symlink():
            continue
        try:
            who = json.loads((p / WRITER_FILE).read_text())
            dead = who.get("host") == socket.gethostname() and not _alive(int(who["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            dead = time.time() - p.stat().st_mtime > UNMARKED_STALE_S
        if dead:
            stale.append(p)
    return stale


def remove_stale_siblings(out: str | Path) -> list[Path]:
    """Remove what stale_siblings finds; returns the folders removed."""
    removed = stale_siblings(out)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _normal_permissions(path: Path) -> None:
    """mkdtemp makes folders 0700; a finished folder gets what the user's umask gives any new one,
    so another account on the clinic machine (the app's service user) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)


@contextmanager
def atomic_directory(out: str | Path, *, exists: Literal["replace", "keep"] = "replace") -> Iterator[Path]:
    """`with atomic_directory(out) as tmp:` write into tmp; on success tmp becomes `out`, on any error
    it is removed. `exists`: what happens when `out` exists by then: replace it (the old folder is
    kept until the new one is in place), or keep it and drop the new copy (another process built the
    same thing first). Checks that must refuse an existing `out` belong inside the block, where
    raising removes tmp."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}", dir=out.parent))
    old = None
    try:
        (tmp / WRITER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        yield tmp
        (tmp / WRITER_FILE).unlink(missing_ok=True)
        _normal_permissions(tmp)
        if out.exists() and exists == "replace":
            old = out.parent / f".{out.name}{OLD_MARK}{tmp.name.rsplit(TMP_MARK, 1)[-1]}"
            os.replace(out, old)
        if not out.exists():
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
