"""The typed arguments of the ONNX steps (what a recipe's onnx-export and onnx-quantize take, every
default filled in the manifest's resolved recipe)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from edgemed.formats.onnx.graph import BlockSize
from edgemed.formats.onnx.int4 import INT4_ALGORITHMS
from edgemed.steps import StepArgs


class OnnxExportArgs(StepArgs):
    opset: int = Field(18, ge=17, le=23)
    # auto: onnxruntime-genai's builder (fused GroupQueryAttention decoder) where it supports the
    # model and is installed, else torch.onnx; the manifest notes which one wrote the decoder.
    decoder: Literal["auto", "torch", "genai"] = "auto"


class Int4Args(StepArgs):
    # mse: blocks on ONNX Runtime's asymmetric MatMulNBits grid (integer zero points, its fastest
    # CPU kernel), each block's scale and zero point searched for the least squared error and the
    # scale refitted (edgemed.formats.onnx.int4.grids.mse_quantize); rtn, hqq and k_quant are ONNX Runtime's
    # MatMulNBitsQuantizer algorithms (rtn spans each block's min..max; HQQ's float zero points
    # have no fast CPU kernel in ONNX Runtime 1.32: about 10x slower here).
    # fmin: affine blocks with a float minimum (llama.cpp's Q4_1 grid) as a symmetric MatMulNBits
    # plus a block-sum correction (see _fmin): exact on Q4_1-grid weights, ~14 more small nodes
    # per layer (0.85x the speed of mse on SmolLM2-135M here).
    # gptq: edgemed's GPTQ on the rtn grid, from calibration passes through the decoder graph
    # (edgemed.formats.onnx.int4.grids); decoder graph only, other graphs use rtn.
    # Each is a registered Int4Algorithm (edgemed.formats.onnx.int4).
    algorithm: str = "mse"
    block_size: BlockSize = 32
    # Where activations are fp16 (GPU targets, see OnnxQuantizeArgs.activations) scales are fp16
    # and blocks are 128, the W4A16 group of AWQ and TensorRT-LLM: decode there is bound by the
    # bytes read, and block 32 would cost 4.5 (rtn) to 5.0 (fmin) bits per weight instead of 4.1-4.25.
    fp16_block_size: BlockSize = 128
    symmetric: bool = False
    # 4 = int8 activations inside MatMulNBits: the fastest CPU kernels (ORT docs).
    accuracy_level: int = Field(4, ge=0, le=4)
    calibration_samples: int = Field(16, ge=1, le=1024)  # gptq and mse: calibration passes through the decoder
    # Language projections kept at int8 (MatMulNBits bits 8) where activations are fp32 (CPU
    # targets), matched as substrings of the decoder's MatMul names (q_proj, qkv_proj, down_proj):
    # llama.cpp's Q4_K_M likewise gives attn_v and ffn_down more bits. On SmolLM2-135M, int8
    # attention q/k/v and MLP down with mse int4 elsewhere: KLD 0.035 (all int4: 0.10) at 1.02-1.09x
    # the speed of onnxruntime-genai's int4 model (bench_smollm2.py, two runs). In the fp16 (GPU) layout every projection is int4,
    # blocks of fp16_block_size (W4A16, the layout AWQ and TensorRT-LLM ship): there decode is
    # bound by bytes and memory is the limit (a 7B LLaVA on an 8 GB Jetson).
    int8_projections: list[str] = Field(default_factory=list)

    @field_validator("algorithm")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in INT4_ALGORITHMS:
            raise ValueError(f"unknown int4 algorithm '{v}'; use one of: {', '.join(INT4_ALGORITHMS)}")
        return v


class Int8Args(StepArgs):
    # nbits: weight-only int8 in blocks along K (MatMulNBits bits=8), with accuracy_level 4
    # quantizing activations per block too, which is what llama.cpp's Q8_0 does; dynamic:
    # quantize_dynamic (per-channel weights, one activation scale per tensor), which an
    # outlier-heavy LLM punishes (SmolLM2-135M: KLD 1.27 vs the parent, measured here).
    method: Literal["nbits", "dynamic"] = "nbits"
    # nbits grids: rtn (ONNX Runtime's quantizer: each block's absmax) or mse (edgemed's symmetric
    # int8 blocks, scale searched for the least squared error weighted by each input channel's mean
    # square on calibration data, then refitted by least squares: grids.mse_quantize_int8).
    algorithm: Literal["rtn", "mse"] = "rtn"
    block_size: BlockSize = 32
    symmetric: bool = True
    accuracy_level: int = Field(4, ge=0, le=4)
    per_channel: bool = True  # dynamic only
    reduce_range: bool = False  # dynamic only


class OnnxQuantizeArgs(StepArgs):
    int4: Int4Args = Field(default_factory=Int4Args)
    int8: Int8Args = Field(default_factory=Int8Args)
    # The float type of activations, float weights and the KV cache. auto: fp16 on a target whose
    # accelerator is a GPU that runs fp16 (tensor cores; half the KV cache and the float weights),
    # fp32 on a CPU (ONNX Runtime's CPU kernels are fastest in fp32), and fp32 for the families whose
    # adapter says fp16 is unsafe (Adapter.fp16_unsafe) whatever the target.
    activations: Literal["auto", "fp32", "fp16"] = "auto"


def onnx_activations(choice: str, target, fp16_unsafe: str | None) -> tuple[str, str | None]:
    """(fp32 | fp16, why) for an ONNX artifact on `target` (a Target or None) of a family whose
    activations leave fp16's range for the reason `fp16_unsafe` (None: fp16 is safe there; an fp16
    graph of an unsafe family would compute inf/NaN)."""
    if choice != "auto":
        return choice, None
    acc = getattr(target, "accelerator", None)
    if acc is None or acc.kind != "gpu" or "fp16" not in target.precisions:
        return "fp32", None
    if fp16_unsafe:
        return "fp32", f"activations stay fp32 on {target.name}: {fp16_unsafe}"
    return "fp16", f"activations, float weights and the KV cache are fp16 on {target.name} (a GPU)"
