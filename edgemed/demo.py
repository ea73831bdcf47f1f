"""The model `compress` uses when no MODEL is given.

Until the trained `edgemed-demo-cxr` ships, this is a tiny LLaVA with a SigLIP tower and random
weights, built deterministically and offline (edgemed.models.tiny) into edgemed's cache folder.
It exercises every stage for real; its answers are noise.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

DEMO_NAME = "edgemed-demo-tiny"
_DEMO_VERSION = "1"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEMED_HOME", Path.home() / ".cache" / "edgemed"))


def demo_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    out = cache_dir() / f"{DEMO_NAME}-v{_DEMO_VERSION}"
    if (out / "config.json").exists():
        return out
    from edgemed.models.tiny import build_tiny

    if progress:
        progress(f"build the demo model {DEMO_NAME} (offline, seeded)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))
    try:
        build_tiny("llava-siglip", tmp, seed=0)
        if not out.exists():
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(model: str | None, progress: Callable[[str], None] | None = None) -> str:
    if model is None or model == DEMO_NAME:
        return str(demo_model_dir(progress))
    return model
