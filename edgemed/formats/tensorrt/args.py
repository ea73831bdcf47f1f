"""tensorrt-export's typed arguments and the names its files and precisions use."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from edgemed.steps import StepArgs

PROFILES_FILE = "trt_profiles.json"
QDQ_PRECISIONS = ("int8", "fp8", "int4")
FLOAT_PRECISIONS = ("fp32", "fp16")
# TensorRT builder flag per precision (trt.BuilderFlag member names).
BUILDER_FLAGS = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8", "fp8": "FP8", "int4": "INT4", "fp4": "FP4"}


class TrtExportArgs(StepArgs):
    # 21: the first opset with INT4 and blocked DequantizeLinear (int4 needs it; fp8 needs >= 19).
    opset: int = Field(21, ge=19, le=23)
    calibration_samples: int = Field(8, ge=1, le=512)
    int4_block_size: int = 128
    # rtn: round-to-nearest blocks (max |w| / 7). awq_clip: AWQ's clip search, activation-aware:
    # per block, the clip ratio that minimizes the output error weighted by the calibration
    # activations' per-channel second moments (no per-channel pre-scaling, so no extra graph op).
    int4_algorithm: Literal["rtn", "awq_clip"] = "awq_clip"
    # Shapes the engines are built for (TensorRT fixes the ranges at build time).
    max_context: int = Field(2048, ge=16)
    max_images: int = Field(1, ge=1, le=64)
    # Layers outside Q/DQ (norms, softmax, attention) may run in fp16 on the device.
    fp16_fallback: bool = True
    # Builder workspace as a share of the target's usable memory, capped.
    workspace_fraction: float = Field(0.25, gt=0, le=0.9)
    max_workspace_gb: float = Field(4.0, gt=0)

    @field_validator("int4_block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError("int4_block_size must be a power of two >= 16")
        return v
