"""Latency, memory and roofline meters for one artifact session. numpy, psutil and the standard
library only (NVML optional), so they run on the device next to the runtime.

Conventions (MLPerf Inference / Client, REFERENCE.md): TTFT is first-token time minus request
time, with image preprocessing and the vision encoder inside it; TPOT = (t_last - t_first) /
(N_out - 1); percentiles p50/p90/p99, never a mean alone.
"""
from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.artifact import FileRecord, Manifest

__all__ = ["percentiles", "latency_summary", "PeakRssSampler", "accelerator_memory", "host_info", "device_info",
           "measure_bandwidth_gb_s", "bytes_per_token", "roofline", "artifact_mb"]


def percentiles(values: Sequence[float], qs=(50, 90, 99)) -> dict[str, float | None]:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {f"p{q}": (float(np.percentile(arr, q)) if arr.size else None) for q in qs}


def latency_summary(results: Sequence[Any]) -> dict[str, Any]:
    """The ``latency`` block from GenerationResults of the measured (post-warm-up) runs.

    decode_tok_s = 1000 / p50 TPOT (a decode step's rate without the prefill); prefill_tok_s =
    prompt tokens / (TTFT - preprocessing - vision encoding), p50 over runs (the prompt's image
    tokens are prefilled too, so they count).
    """
    ttft = [r.ttft_ms for r in results if r.ttft_ms is not None]
    tpot = [r.tpot_ms for r in results if r.tpot_ms is not None]
    vision = [r.vision_encode_s * 1e3 for r in results if r.vision_encode_s]
    pre = [r.preprocess_s * 1e3 for r in results if r.preprocess_s]
    prefill_rates = []
    for r in results:
        if r.token_times_s:
            t = r.token_times_s[0] - r.preprocess_s - r.vision_encode_s
            if t > 0:
                prefill_rates.append(r.prompt_tokens / t)
    tpot_p = percentiles(tpot, (50, 90, 99))
    out: dict[str, Any] = {
        "runs": len(results),
        "output_tokens_per_run": len(results[0].token_ids) if results else None,
        "prompt_tokens": results[0].prompt_tokens if results else None,
        "ttft_ms": percentiles(ttft),
        "tpot_ms": tpot_p,
        "decode_tok_s": (1000.0 / tpot_p["p50"]) if tpot_p["p50"] else None,
        "prefill_tok_s": float(np.median(prefill_rates)) if prefill_rates else None,
        "vision_encode_ms": {"p50": float(np.median(vision)) if vision else None},
        "preprocess_ms": {"p50": float(np.median(pre)) if pre else None},
        "ttft_ms_samples": ttft,
        "tpot_ms_samples": tpot,
    }
    if not tpot:
        out["decode_tok_s_unavailable_reason"] = "every run produced fewer than 2 tokens (TPOT needs 2)"
    if not vision:
        out["vision_encode_ms_unavailable_reason"] = "no image in the latency request (text-only model)"
    return out


class PeakRssSampler:
    """Peak resident set size of this process, sampled every ``interval_s`` in a daemon thread
    (psutil), from start() to stop(). Short spikes between samples can be missed; 5 ms catches
    the allocations that matter (weights, KV, logits)."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self._proc = psutil.Process(os.getpid())
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> PeakRssSampler:
        self._sample()
        self._thread = threading.Thread(target=self._run, name="edgemed-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._sample()
        return self.peak_bytes / 1e6

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def accelerator_memory(nvml=None) -> tuple[float | None, str | None]:
    """(MB this process holds on GPU 0, None) through NVML, or (None, reason)."""
    try:
        if nvml is None:
            import pynvml as nvml  # noqa: PLC0415  optional (nvidia-ml-py)
    except ImportError:
        return None, "no accelerator memory counter: pynvml (nvidia-ml-py) is not installed"
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001  NVMLError subclasses for every cause
        return None, f"no NVIDIA GPU or driver ({type(e).__name__})"
    try:
        if nvml.nvmlDeviceGetCount() == 0:
            return None, "NVML found no GPU"
        h = nvml.nvmlDeviceGetHandleByIndex(0)
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
        used = [p.usedGpuMemory for p in procs if p.pid == os.getpid() and p.usedGpuMemory is not None]
        if not used:
            return None, "this process holds no GPU memory (the session runs on the CPU)"
        return sum(used) / 1e6, None
    except Exception as e:  # noqa: BLE001
        return None, f"NVML memory query failed ({type(e).__name__}: {e})"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def host_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    accel = None
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount():
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            accel = name.decode() if isinstance(name, bytes) else str(name)
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001  no NVML: no (NVIDIA) accelerator to name
        if Path("/etc/nv_tegra_release").exists():
            accel = "NVIDIA Jetson (integrated GPU)"
    return {"cpu": cpu, "cores": psutil.cpu_count(logical=True),
            "physical_cores": psutil.cpu_count(logical=False), "accelerator": accel,
            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "python": platform.python_version(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1)}


def _nvml_gpu(nvml=None) -> dict[str, Any]:
    """GPU 0's identity, versions and clocks from NVML, or {"unavailable_reason": ...}."""
    try:
        if nvml is None:
            import pynvml as nvml  # noqa: PLC0415  optional (nvidia-ml-py)
    except ImportError:
        return {"unavailable_reason": "pynvml (nvidia-ml-py) is not installed"}
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001
        return {"unavailable_reason": f"no NVIDIA driver ({type(e).__name__})"}

    def ask(fn, *args):
        try:
            v = getattr(nvml, fn)(*args)
            return v.decode() if isinstance(v, bytes) else v
        except Exception:  # noqa: BLE001  a counter this GPU or driver lacks
            return None

    try:
        if not ask("nvmlDeviceGetCount"):
            return {"unavailable_reason": "NVML found no GPU"}
        h = nvml.nvmlDeviceGetHandleByIndex(0)
        cuda = ask("nvmlSystemGetCudaDriverVersion")
        mem = ask("nvmlDeviceGetMemoryInfo", h)
        limit = ask("nvmlDeviceGetPowerManagementLimit", h)
        clock = lambda kind, which: ask(which, h, getattr(nvml, kind, None))  # noqa: E731
        return {
            "name": ask("nvmlDeviceGetName", h), "driver": ask("nvmlSystemGetDriverVersion"),
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None,
            "memory_total_mb": mem.total / 1e6 if mem is not None else None,
            "sm_clock_mhz": clock("NVML_CLOCK_SM", "nvmlDeviceGetClockInfo"),
            "sm_clock_max_mhz": clock("NVML_CLOCK_SM", "nvmlDeviceGetMaxClockInfo"),
            "mem_clock_mhz": clock("NVML_CLOCK_MEM", "nvmlDeviceGetClockInfo"),
            "mem_clock_max_mhz": clock("NVML_CLOCK_MEM", "nvmlDeviceGetMaxClockInfo"),
            "performance_state": ask("nvmlDeviceGetPerformanceState", h),
            "power_limit_w": limit / 1e3 if isinstance(limit, (int, float)) else None,
            "persistence_mode": ask("nvmlDeviceGetPersistenceMode", h),
            "source": "NVML",
        }
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _runtime_versions() -> dict[str, Any]:
    """Versions of the runtimes a session may use, and what each can do with a GPU here."""
    out: dict[str, Any] = {}
    try:
        import onnxruntime as ort  # noqa: PLC0415

        out["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        pass
    try:
        import llama_cpp  # noqa: PLC0415

        out["llama_cpp"] = {"version": llama_cpp.__version__, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: PLC0415

        out["tensorrt"] = {"version": tensorrt.__version__}
    except ImportError:
        pass
    return out


def device_info(session=None, nvml=None) -> dict[str, Any]:
    """What a GPU measurement needs beside its numbers: where the session ran and why, the GPU,
    driver and CUDA versions, clocks and power limit (NVML), the Jetson power mode (nvpmodel), and
    the runtimes' versions."""
    from edgemed.host import read_power_mode

    choice = getattr(session, "device", None)
    out: dict[str, Any] = {"ran_on": choice.device if choice is not None else "cpu",
                           "requested": choice.requested if choice is not None else None,
                           "reason": choice.reason if choice is not None else "the session does not say (CPU)"}
    providers = getattr(session, "providers", None)
    if providers:
        out["onnxruntime_providers"] = list(providers)
    if getattr(session, "n_gpu_layers", None) is not None:
        out["llama_cpp_n_gpu_layers"] = session.n_gpu_layers
    out["gpu"] = _nvml_gpu(nvml)
    mode = read_power_mode()
    out["power_mode"] = str(mode) if mode is not None else None
    out["runtimes"] = _runtime_versions()
    return out


def measure_bandwidth_gb_s(nbytes: int = 256_000_000, repeats: int = 5) -> float:
    """Host memory bandwidth from a numpy copy of ``nbytes`` (counted as read + write traffic,
    2 x nbytes per copy), best of ``repeats``. One thread, as ONNX Runtime's decode mostly
    streams weights from one core's view per op; a multi-threaded STREAM reads more."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def _file_component(rec: "FileRecord") -> set[str]:
    return set(str(rec.component or "").split("+"))


def bytes_per_token(artifact_dir: Path, manifest: "Manifest", context_tokens: float,
                    kv_bytes_per_element: int | None = None) -> dict[str, Any]:
    """Bytes a decode step reads: every file holding language or lm_head weights (with its
    external-data file), one embedding row, and the KV cache at ``context_tokens``.

    KV element size: what the session reports (``kv_bytes_per_element``), else what the planner
    counted for this artifact's layout (the manifest's plan: ONNX on a CPU keeps KV in fp32; llama.cpp
    and TensorRT f16), else 4. The vision tower runs once per image, not per token, so it is not counted.
    """
    files = manifest.files
    per_token_files = [f for f in files if _file_component(f) & {"language", "lm_head"}]
    stems = {f.path for f in per_token_files}  # a graph's external data: onnx/<graph>_data, <graph>.data
    extra = [f for f in files if f not in per_token_files and any(f.path.startswith(s) and f.path != s
                                                                  for s in stems)]
    weights = sum(f.bytes for f in per_token_files + extra)
    text = manifest.model.text if manifest.model else {}
    embed_files = [f for f in files if _file_component(f) == {"embed"}]
    vocab = int(text.get("vocab_size") or 1)
    embed_row = sum(f.bytes for f in embed_files) // max(vocab, 1)
    if any("embed" in _file_component(f) for f in per_token_files):
        # One graph holds the table too (a text LLM's onnx/model.onnx): a decode step gathers one
        # row of it, so the table comes off, sized from the recipe's embed precision.
        bits = {"fp32": 32, "fp16": 16, "int8": 8.5}.get(((manifest.recipe or {}).get("policy") or {}).get("embed"), 32)
        table = int(vocab * int(text.get("hidden_size") or 0) * bits / 8)
        weights, embed_row = max(weights - table, 0), table // max(vocab, 1)
    kv_elem = kv_bytes_per_element or int((manifest.plan or {}).get("kv_bytes_per_element") or 4)
    kv = 2 * int(text.get("num_layers", 0)) * int(text.get("num_kv_heads", 0)) * int(text.get("head_dim", 0)) \
        * context_tokens * kv_elem
    return {"bytes_per_token": int(weights + embed_row + kv), "weight_bytes": int(weights),
            "embed_row_bytes": int(embed_row), "kv_bytes": int(kv), "kv_bytes_per_element": kv_elem,
            "context_tokens": context_tokens, "files": sorted(f.path for f in per_token_files + extra)}


def roofline(artifact_dir: Path, manifest: "Manifest", decode_tok_s: float | None, context_tokens: float, *,
             on_accelerator: bool = False, bandwidth_gb_s: float | None = None,
             kv_bytes_per_element: int | None = None) -> dict[str, Any]:
    """Decode ceiling = bandwidth / bytes per token, and the fraction the measured decode reached.

    Bandwidth: ``bandwidth_gb_s`` if given; else measured on the host (numpy copy) when the
    session runs on the CPU; else the target's spec from the manifest (a GPU's memory cannot be
    measured from numpy).
    """
    bpt = bytes_per_token(artifact_dir, manifest, context_tokens, kv_bytes_per_element)
    spec = (manifest.target or {}).get("memory_bandwidth_gb_s")
    if bandwidth_gb_s is not None:
        bw, source = float(bandwidth_gb_s), "given"
    elif on_accelerator:
        bw, source = spec, "target spec (the session runs on an accelerator; host copy not representative)"
    else:
        try:
            bw, source = measure_bandwidth_gb_s(), "measured: numpy copy of 256 MB, read+write, best of 5"
        except MemoryError:
            bw, source = spec, "target spec (not enough memory to measure)"
    out: dict[str, Any] = {"bandwidth_gb_s": bw, "bandwidth_source": source, "target_spec_bandwidth_gb_s": spec,
                           **bpt}
    if bw is None:
        out.update(decode_ceiling_tok_s=None, fraction=None,
                   roofline_unavailable_reason="no bandwidth measured and none in the target spec")
        return out
    ceiling = bw * 1e9 / bpt["bytes_per_token"] if bpt["bytes_per_token"] else None
    out["decode_ceiling_tok_s"] = ceiling
    out["fraction"] = decode_tok_s / ceiling if (ceiling and decode_tok_s) else None
    if spec and bpt["bytes_per_token"]:
        out["target_spec_decode_ceiling_tok_s"] = spec * 1e9 / bpt["bytes_per_token"]
    if out["fraction"] is None:
        out["fraction_unavailable_reason"] = "no decode rate measured"
    elif bpt["weight_bytes"] < 64e6:
        out.setdefault("notes", []).append(
            "the per-token weights fit in CPU caches, so the DRAM roofline is not the binding limit "
            "(per-step overheads are): a low fraction here says little about a full-size model")
    return out


def artifact_mb(manifest: "Manifest", artifact_dir: Path | None = None) -> dict[str, float]:
    """Deployable size (every file but the cached parent reference) and the reference's size."""
    sizes = [(f.bytes, f.component) for f in manifest.files]
    if not sizes and artifact_dir is not None:
        sizes = [(p.stat().st_size, "support") for p in Path(artifact_dir).iterdir() if p.is_file()]
    ref = sum(b for b, component in sizes if component == "reference")
    total = sum(b for b, _ in sizes)
    return {"artifact_mb": (total - ref) / 1e6, "reference_mb": ref / 1e6}
