"""The Context a recipe step runs in: the loaded model, the resolved recipe and target, and the
artifact folder being written."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.models import CompositeModel
    from edgemed.recipe import Recipe
    from edgemed.target import Target


SCRATCH = ".scratch"


@dataclass
class Context:
    """What a step sees: the model, the resolved recipe and target, and the artifact being written."""

    cm: "CompositeModel"
    recipe: "Recipe"
    target: "Target"
    work_dir: Path
    progress: Callable[[str], None] = lambda msg: None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # How the runtime must drive the artifact (e.g. kv_cache: shared_buffer), saved in the manifest.
    runtime: dict[str, Any] = field(default_factory=dict)
    # The calibration set a step used (source, count, modalities, sha256 of the sample list).
    calibration: dict[str, Any] | None = None
    # A copy of the model as loaded, kept only while a later `distill` step needs its logits.
    teacher: Any = None
    # Its StreamedWeights where it is read from the checkpoint while it runs (pipeline._teacher).
    teacher_weights: Any = None

    def scratch(self) -> Path:
        """A folder inside the artifact being written for a step's intermediate files (a streamed
        transform's tensors, read until parity is done); compress removes it before the manifest
        lists the files, and with the rest of the temporary folder when it fails."""
        d = self.work_dir / SCRATCH
        d.mkdir(exist_ok=True)
        return d

    def describe(self, rel: str, component: str, fmt: str, precision: str | None) -> None:
        self.files[rel] = {"component": component, "format": fmt, "precision": precision}
