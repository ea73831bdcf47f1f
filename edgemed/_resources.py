"""Where edgemed's files are: the shipped recipes/ and targets/ folders (the source checkout, or a
wheel's share/), the cache folder models, calibration sets and checkpoints are built in, and
whether the Hugging Face hub may be asked for anything at all (offline unless the user says so)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def shipped_dir(kind: str) -> Path:
    """`kind` is 'recipes' or 'targets'."""
    for cand in (_ROOT / kind, Path(sys.prefix) / "share" / "edgemed" / kind):
        if cand.is_dir():
            return cand
    return _ROOT / kind


def shipped_names(kind: str) -> list[str]:
    return sorted(p.stem for p in shipped_dir(kind).glob("*.yaml"))


def cache_dir() -> Path:
    """edgemed's cache: $EDGEMED_HOME, else ~/.cache/edgemed."""
    return Path(os.environ.get("EDGEMED_HOME", Path.home() / ".cache" / "edgemed"))


ONLINE_ENV = "EDGEMED_ONLINE"
OFFLINE_FIX = f"edgemed works offline: pass --online (or set {ONLINE_ENV}=1) to let it download this once"


def online() -> bool:
    """Nothing leaves the machine unless the user asked: `edgemed --online` or EDGEMED_ONLINE=1."""
    return os.environ.get(ONLINE_ENV) == "1"
