"""Which device a session runs on: `load(dir, device="auto" | "cpu" | "cuda")`.

"cpu" always works. "cuda" needs an NVIDIA GPU on this machine (NVML, or the driver's device
nodes on a Jetson) and a runtime built for it (the format backend says which: ONNX Runtime's CUDA
execution provider, llama.cpp built with a GPU backend, TensorRT); without either it is refused
before anything loads (BadInputError, exit 2) with the fix. "auto" runs where the artifact's target
computes: on the GPU when the target has one and this machine can run it there, on the CPU
otherwise. Every session keeps the choice (`session.device`) and the bench report says which ran
and why.

Standard library only (plus what the backend's check imports), so it stays torch-free.
"""
from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass
from typing import Any

from edgemed.errors import BadInputError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DeviceChoice:
    requested: str  # what the caller asked for
    device: str  # "cpu" or "cuda": where the session runs
    reason: str  # why (shown in reports)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def gpu_absent_reason() -> str | None:
    """None when this machine has an NVIDIA GPU, else why not. NVML first (desktop and server
    GPUs); a Jetson's integrated GPU has no NVML device but its driver's device nodes
    (/dev/nvhost-*, /dev/nvgpu). EDGEMED_FORCE_NO_GPU=1 hides a GPU (tests, a CPU-only comparison)."""
    if os.environ.get("EDGEMED_FORCE_NO_GPU") == "1":
        return "EDGEMED_FORCE_NO_GPU=1 hides the GPU"
    try:
        import pynvml  # noqa: PLC0415  optional (nvidia-ml-py)

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() > 0:
                return None
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001  no pynvml, no driver: fall through to the device nodes
        pass
    if glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/nvhost-gpu") or glob.glob("/dev/nvgpu/igpu*"):
        return None
    return "this machine has no NVIDIA GPU (no NVML device, no /dev/nvidia* or Jetson GPU node)"


def target_has_gpu(target: dict | None) -> bool:
    acc = (target or {}).get("accelerator")
    return bool(acc) and acc.get("kind") == "gpu"


_LOOK_UP = "look up"


def choose_device(requested: str | None, fmt: str, target: dict | None, runtime_reason: str | None,
                  gpu_reason: str | None = _LOOK_UP, *, source: str = "--device") -> DeviceChoice:
    """The device for a `fmt` artifact built for `target`. runtime_reason: why this format's runtime
    cannot use CUDA here (None: it can); gpu_reason: why this machine has no GPU (None: it has one;
    gpu_absent_reason() when not given)."""
    requested = requested or "auto"
    if requested not in DEVICES:
        raise BadInputError(f"{source} {requested}", "is not a device edgemed knows", f"use one of: {', '.join(DEVICES)}")
    if requested == "cpu":
        return DeviceChoice("cpu", "cpu", "asked for the CPU")
    gpu = gpu_absent_reason() if gpu_reason is _LOOK_UP else gpu_reason
    if requested == "cuda":
        if gpu:
            raise BadInputError(f"{source} cuda", gpu, f"run it with {source} cpu (or auto), or on a machine with an NVIDIA GPU")
        if runtime_reason:
            raise BadInputError(f"{source} cuda", f"the {fmt} runtime here cannot use the GPU: {runtime_reason}",
                                f"install the GPU build named there, or run with {source} cpu")
        return DeviceChoice("cuda", "cuda", "asked for the GPU")
    name = (target or {}).get("name") or "unknown"
    if not target_has_gpu(target):
        return DeviceChoice("auto", "cpu", f"the artifact's target ({name}) computes on its CPU")
    if gpu:
        return DeviceChoice("auto", "cpu", f"the target ({name}) has a GPU but {gpu}")
    if runtime_reason:
        return DeviceChoice("auto", "cpu", f"the target ({name}) has a GPU but the {fmt} runtime here cannot use it: "
                            f"{runtime_reason}")
    return DeviceChoice("auto", "cuda", f"the target ({name}) has a GPU and this machine can run {fmt} on one")


def onnx_providers(device: str, available: list[str], *, device_id: int = 0,
                   trt_cache_dir: str | None = None) -> list[Any]:
    """ONNX Runtime providers for `device`, in priority order: on "cuda", TensorRT's execution
    provider first where this onnxruntime has it (nodes it cannot take fall to CUDA), then CUDA,
    then the CPU for what neither implements."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    out: list[Any] = []
    if "TensorrtExecutionProvider" in available:
        opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": True}
        if trt_cache_dir:  # engines built once per machine, kept outside the (verified, read-only) artifact
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=trt_cache_dir)
        out.append(("TensorrtExecutionProvider", opts))
    out.append(("CUDAExecutionProvider", {"device_id": device_id}))
    out.append("CPUExecutionProvider")
    return out


__all__ = ["DEVICES", "DeviceChoice", "choose_device", "gpu_absent_reason", "onnx_providers", "target_has_gpu"]
