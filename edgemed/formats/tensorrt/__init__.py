"""TensorRT backend: Q/DQ ONNX graphs per the component policy and build profiles, engines built
on the device (`edgemed build-engine`), run by TensorRT where it imports and by ONNX Runtime on
the same Q/DQ graphs elsewhere.

    steps.py      tensorrt-export (Q/DQ graphs, calibration, build profiles)
    engine.py     build_engines on the device
    session.py    the runtime session
"""
from __future__ import annotations

from edgemed.formats.base import GB, RUNTIME_OVERHEAD_FIXED_BYTES, FormatBackend


class TensorrtBackend(FormatBackend):
    name = "tensorrt"
    # Not measured separately: the Q/DQ export goes through the same fp32 graph and calibration
    # probe as ONNX's int4, so it is planned like it.
    host_transient, host_transient_fixed, host_scratch = 3.7, 0, 1.0
    target_specific = True  # build profiles sized for the target's memory
    precisions = frozenset({"fp32", "fp16", "bf16", "int8", "int4", "fp8", "fp4"})
    # The embedding table is a Gather, not a MatMul: no Q/DQ form for it.
    component_precisions = {"embed": frozenset({"fp32", "fp16"})}

    def int4_layout(self) -> tuple[int, int, int]:
        return 128, 2, 0  # ModelOpt INT4 AWQ: block 128, fp16 scale, no zero point

    def int8_per_channel_bytes(self) -> int:
        return 4  # the scale only

    def kv_bytes_per_element(self) -> int:
        return 2  # engines keep an fp16 KV cache on the GPU

    def build_reasons(self, components: dict, usable_bytes: int) -> list[str]:
        """`edgemed build-engine` builds one engine per graph; the largest is the decoder (language +
        lm_head). TensorRT holds the parsed weights and the engine being built at once, plus the builder
        workspace (the recipe's share of usable memory, capped) and its CUDA context. On a Jetson both
        copies sit in the one shared DRAM; on a discrete GPU the parsed copy is in host memory."""
        args = self.recipe.step_args("tensorrt-export")
        target = self.target
        workspace = min(usable_bytes * args.workspace_fraction, args.max_workspace_gb * GB)
        decoder = sum(c.bytes for n, c in components.items() if n in ("language", "lm_head"))
        shared = bool(target.accelerator and target.accelerator.memory_shared_with_cpu)
        need = decoder * (2 if shared else 1) + workspace + RUNTIME_OVERHEAD_FIXED_BYTES
        if need <= usable_bytes:
            return []
        return [f"building the decoder engine needs about {need / GB:.2f} GB (weights {decoder / GB:.2f} GB"
                f"{' x 2: parsed network and engine share memory' if shared else ''} + builder workspace "
                f"{workspace / GB:.2f} GB + CUDA context), but {target.name} leaves {target.usable_memory_gb:g} GB"]

    @classmethod
    def required_files(cls, manifest) -> list[str]:
        from edgemed.formats.onnx import OnnxBackend

        engines = (manifest.runtime.get("trt") or {}).get("engines") or {}
        return [*OnnxBackend.required_files(manifest), "trt_profiles.json", *engines.values()]

    @classmethod
    def check_files(cls, root, manifest) -> None:
        from edgemed.formats.onnx import OnnxBackend

        OnnxBackend.check_files(root, manifest)  # the Q/DQ graphs are ONNX

    @classmethod
    def cuda_unavailable_reason(cls, path, manifest) -> str | None:
        from edgemed.formats.tensorrt.session import engines_built, tensorrt_available

        if engines_built(path, manifest) is None:
            return f"no TensorRT engines are built for it (run `edgemed build-engine {path}` on this machine)"
        return tensorrt_available()

    @classmethod
    def open_session(cls, path, manifest, **kwargs):
        # TensorRT engines where `edgemed build-engine` built them and tensorrt imports; otherwise
        # the same Q/DQ ONNX graphs on ONNX Runtime (host parity, a machine without TensorRT).
        from edgemed.formats.tensorrt.session import open_tensorrt

        return open_tensorrt(path, manifest, **kwargs)
