"""Recipe steps. Importing this package registers every shipped step (no heavy imports here)."""
from edgemed.steps.base import STEPS, Step, StepArgs
from edgemed.steps import onnx_steps  # noqa: F401  (registers onnx-export, onnx-quantize)
from edgemed.steps import gguf_steps  # noqa: F401  (registers gguf-export, gguf-quantize)
from edgemed.steps import trt_steps  # noqa: F401  (registers tensorrt-export)
from edgemed.steps import prune  # noqa: F401  (registers prune-depth, prune-width, prune-sparse)
from edgemed.steps import moe  # noqa: F401  (registers moe-distill)
from edgemed.steps import distill  # noqa: F401  (registers distill)

__all__ = ["STEPS", "Step", "StepArgs"]
