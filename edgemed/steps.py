"""Step registry: every transformation a recipe can name (prune, distill, export, quantize).

Adding an algorithm is adding one module with one subclass (and its module name in STEP_MODULES);
the recipe loader, the planner and `edgemed recipes` ask this registry, never an if-chain.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from edgemed.registry import Registry

# Where the shipped steps live: each format backend's steps, then the model-stage transforms.
STEP_MODULES = (
    "edgemed.formats.onnx.steps",
    "edgemed.formats.gguf.steps",
    "edgemed.formats.tensorrt.steps",
    "edgemed.transforms.prune",
    "edgemed.transforms.sparsity",
    "edgemed.transforms.moe",
    "edgemed.transforms.distill",
)


class StepArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step:
    """A registered recipe step.

    stage 'model': transforms the loaded PyTorch model in place (pruning, MoE distillation).
    stage 'export': writes the target format's files from the model.
    stage 'artifact': rewrites the exported files (post-export quantization).
    """

    name: ClassVar[str]
    stage: ClassVar[Literal["model", "export", "artifact"]]
    formats: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    Args: ClassVar[type[StepArgs]] = StepArgs
    # True where the step reads the parent only through its forward pass and
    # CompositeModel.weight_reader, so it runs with the weights left on disk (compress --low-memory).
    streams: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            STEPS.register(cls.name)(cls)

    def __init__(self, args: StepArgs):
        self.args = args

    def stream_refusal(self, target=None) -> str | None:
        """Why these arguments cannot run with the weights left on disk (None: they can); for a
        step that `streams` except with some arguments. `target`: the resolved Target, where known."""
        return None

    def run(self, ctx) -> None:  # ctx: edgemed.context.Context  # pragma: no cover - abstract
        raise NotImplementedError


STEPS: Registry[type[Step]] = Registry("recipe step", plugins=STEP_MODULES)
