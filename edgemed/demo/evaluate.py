"""`python -m edgemed.demo.train eval MODEL_DIR`: the demo model's closed accuracy and open recall.

Scored through edgemed's bench (imported here, never by :mod:`edgemed.demo.cxr`, which `compress`
imports: bench importing the demo and the demo importing bench would be a cycle).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def evaluate(model_dir: str | os.PathLike, n_images: int = 100, seed: int = 0,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Closed accuracy and open recall of the PyTorch model on the synthetic-cxr test split,
    through edgemed's bench (same prompts, greedy decoding, same scoring as `edgemed bench`)."""
    import torch

    from edgemed.bench.runner import run_suite
    from edgemed.bench.suites import load_suite
    from edgemed.data.synthetic_cxr import generate
    from edgemed.models import load_model
    from edgemed.reference.parent import ParentSession

    torch.set_num_threads(max(1, os.cpu_count() or 1))  # every core, as training does
    with tempfile.TemporaryDirectory() as td:
        generate(Path(td) / "suite", n_images * 10, seed, splits={"train": 0.9, "test": 0.1})
        items = list(load_suite("synthetic-cxr", str(Path(td) / "suite"), split="test"))
        cm = load_model(str(model_dir))
        block, preds = run_suite(ParentSession(cm), "synthetic-cxr", items, max_new_tokens=8, progress=say)
    return {"n_items": len(items), "closed_acc": block.get("closed_acc"), "open_recall": block.get("open_recall"),
            "block": block, "preds": preds[:40]}
