"""The GPU path, everything around the device tested on the CPU: which device a session picks and
why, the providers ONNX Runtime gets, the IOBinding path that keeps the KV cache where the session
runs, the report's device block, `--device cuda` refused cleanly without a GPU, and
bench/device_check.py run end to end on the CPU (its dry run)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemed.errors import BadInputError
from edgemed.runtime.device import DeviceChoice, choose_device, gpu_absent_reason, onnx_providers

REPO = Path(__file__).resolve().parents[1]
GPU_TARGET = {"name": "rtx-4060-8gb", "accelerator": {"kind": "gpu", "name": "RTX 4060"}}
CPU_TARGET = {"name": "cpu-x86-avx2", "accelerator": None}


def test_choose_device_explains_every_choice():
    assert choose_device("cpu", "onnx", GPU_TARGET, None, None) == DeviceChoice("cpu", "cpu", "asked for the CPU")
    assert choose_device("cuda", "onnx", CPU_TARGET, None, None).device == "cuda"  # asked: the target does not matter
    auto = choose_device("auto", "onnx", CPU_TARGET, None, None)
    assert auto.device == "cpu" and "cpu-x86-avx2" in auto.reason
    assert choose_device("auto", "gguf", GPU_TARGET, None, None).device == "cuda"
    no_gpu = choose_device("auto", "gguf", GPU_TARGET, None, "no NVIDIA GPU here")
    assert no_gpu.device == "cpu" and "no NVIDIA GPU here" in no_gpu.reason
    no_build = choose_device("auto", "onnx", GPU_TARGET, "no CUDAExecutionProvider", None)
    assert no_build.device == "cpu" and "CUDAExecutionProvider" in no_build.reason
    assert choose_device(None, "onnx", CPU_TARGET, None, None).requested == "auto"


@pytest.mark.parametrize("gpu, runtime, says", [
    ("this machine has no NVIDIA GPU", None, "no NVIDIA GPU"),
    (None, "onnxruntime 1.32 has no CUDAExecutionProvider", "CUDAExecutionProvider"),
])
def test_cuda_refused_with_the_fix(gpu, runtime, says):
    with pytest.raises(BadInputError) as e:
        choose_device("cuda", "onnx", GPU_TARGET, runtime, gpu)
    assert says in str(e.value) and "--device cpu" in str(e.value) and e.value.exit_code == 2


def test_unknown_device_refused():
    with pytest.raises(BadInputError, match="auto, cpu, cuda"):
        choose_device("tpu", "onnx", GPU_TARGET, None, None)


def test_gpu_hidden_by_env(monkeypatch):
    monkeypatch.setenv("EDGEMED_FORCE_NO_GPU", "1")
    assert "EDGEMED_FORCE_NO_GPU" in gpu_absent_reason()


def test_onnx_providers_in_priority_order(tmp_path):
    assert onnx_providers("cpu", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]) \
        == ["CPUExecutionProvider"]
    got = onnx_providers("cuda", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                         trt_cache_dir=str(tmp_path))
    assert [p if isinstance(p, str) else p[0] for p in got] == \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = got[0][1]
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == str(tmp_path) and trt["trt_fp16_enable"]
    assert [p if isinstance(p, str) else p[0] for p in onnx_providers("cuda", ["CUDAExecutionProvider"])] == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_load_on_this_machine_picks_the_cpu_and_says_why(artifact):
    from edgemed.runtime import load

    s = load(artifact("llava-siglip", "int8"))
    assert s.device.device == "cpu" and s.device.requested == "auto" and "cpu-x86-avx2" in s.device.reason
    assert s.providers == ["CPUExecutionProvider"] and not s.on_accelerator


def test_kv_cache_stays_in_ort_values_between_steps(artifact):
    """The IOBinding path the CUDA provider uses (past bound from the last step's present, nothing
    copied to numpy), on the CPU provider: its logits equal the prefill's at every position."""
    import onnxruntime as ort

    from edgemed.runtime import load

    s = load(artifact("llava-siglip", "int8"), device="cpu")
    ids = s.prompt_ids("Is there an effusion?", False)
    past = s.empty_past(len(ids))
    _, past = s.forward(s.input_embeds(ids[:3], None), past, ids[:3])
    assert type(past).__name__ == "SharedKV"  # the builder's GroupQueryAttention: one buffer, written in place
    assert all(isinstance(v, ort.OrtValue) and v.device_name().lower() == "cpu" for v in past.buffers.values())
    assert past.length == 3
    np.testing.assert_allclose(s.logits(ids, decode_from=2), s.logits(ids), rtol=1e-4, atol=1e-4)


def test_a_cuda_session_without_the_provider_is_refused(artifact):
    """onnxruntime quietly falls back to the CPU when the CUDA provider cannot start: edgemed refuses."""
    from edgemed.artifact import read_manifest
    from edgemed.formats.onnx.session import OnnxSession

    art = artifact("llava-siglip", "int8")
    with pytest.raises(BadInputError, match="CUDA execution provider"):
        OnnxSession(art, read_manifest(art), device=DeviceChoice("cuda", "cuda", "test"))


def test_bench_and_serve_refuse_cuda_without_a_gpu(artifact, tmp_path, capsys):
    from edgemed.cli import main

    art = artifact("llava-siglip", "int8")
    assert main(["bench", str(art), "--device", "cuda", "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err
    assert main(["bench", str(art), "--device", "tpu", "--output", str(tmp_path / "r.json")]) == 2
    assert main(["serve", str(art), "--device", "cuda", "--port", "1"]) == 2
    assert not (tmp_path / "r.json").exists()


def test_bench_report_says_where_it_ran(artifact):
    from edgemed.bench import run_bench
    from edgemed.bench.report import markdown

    r = run_bench(artifact("llava-siglip", "int8"), runs=2, warmup=0, max_new_tokens=3, plots=False,
                  record_in_manifest=False, device="cpu")
    d = r["device"]
    assert d["ran_on"] == "cpu" and d["requested"] == "cpu" and d["reason"] == "asked for the CPU"
    assert d["onnxruntime_providers"] == ["CPUExecutionProvider"]
    assert d["runtimes"]["onnxruntime"]["providers"] and "unavailable_reason" in d["gpu"]
    assert "- ran on: cpu (asked for the CPU)" in markdown(r)


def test_gpu_facts_from_nvml():
    """The GPU block as NVML gives it (a stand-in module with NVML's calls and an H200's answers)."""
    import types

    from edgemed.bench.meters import _nvml_gpu

    h = object()
    nvml = types.SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: h,
        nvmlSystemGetCudaDriverVersion=lambda: 12080, nvmlSystemGetDriverVersion=lambda: b"570.86.15",
        nvmlDeviceGetName=lambda _: "NVIDIA H200", nvmlDeviceGetMemoryInfo=lambda _: types.SimpleNamespace(total=150e9),
        nvmlDeviceGetClockInfo=lambda _, k: {1: 1980, 2: 3201}[k],
        nvmlDeviceGetMaxClockInfo=lambda _, k: {1: 1980, 2: 3201}[k],
        nvmlDeviceGetPerformanceState=lambda _: 0, nvmlDeviceGetPowerManagementLimit=lambda _: 700000)
    g = _nvml_gpu(nvml)
    assert (g["name"], g["driver"], g["cuda_driver"], g["power_limit_w"], g["sm_clock_max_mhz"]) == \
        ("NVIDIA H200", "570.86.15", "12.8", 700.0, 1980)
    assert g["persistence_mode"] is None  # a counter the stand-in lacks: null, not a crash


@pytest.mark.slow
def test_gguf_on_cuda_offloads_every_layer_with_an_f16_cache(artifact, monkeypatch):
    """What device "cuda" asks of llama.cpp (all layers, mmproj on the GPU, F16 KV as llama.cpp
    deploys), checked against this CPU build, which accepts the same parameters."""
    import edgemed.runtime.device as dev
    from edgemed.formats.gguf import GgufBackend
    from edgemed.runtime import load

    art = artifact("llava-siglip", "q8_0")
    with pytest.raises(BadInputError, match="GPU backend|no NVIDIA GPU"):
        load(art, device="cuda")
    monkeypatch.setattr(dev, "gpu_absent_reason", lambda: None)
    monkeypatch.setattr(GgufBackend, "cuda_unavailable_reason", classmethod(lambda cls, p, m: None))
    s = load(art, device="cuda")
    assert s.device.device == "cuda" and s.n_gpu_layers == -1 and s.llm.context_params.type_k == 1  # GGML_TYPE_F16
    cpu = load(art, device="cpu")
    assert cpu.n_gpu_layers == 0 and cpu.llm.context_params.type_k == 0
    ids = cpu.prompt_ids("Is there an effusion?", False)
    from edgemed.reference.metrics import compare_logits

    agree = compare_logits(cpu.logits(ids), s.logits(ids))  # F16 KV vs F32 on the same weights
    # (a random tiny model's logits are near ties, so an F16 cache flips a few top-1s: KLD is the check)
    assert agree["kld_mean"] < 1e-3 and agree["top1_agreement"] >= 0.9, agree


def test_device_check_script_dry_run_without_torch(artifact, tmp_path):
    """bench/device_check.py end to end: on a machine without a GPU the GPU check is recorded with
    its reason (exit 0), and its CPU dry run measures agreement, speed and the roofline."""
    from tests.no_torch import BLOCK_TORCH

    art = artifact("llava-siglip", "int8")
    script = REPO / "bench" / "device_check.py"

    def run(*args):
        code = BLOCK_TORCH + f"import runpy, sys; sys.argv = {[str(script), *map(str, args)]!r}; " \
                             f"runpy.run_path({str(script)!r}, run_name='__main__')"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)

    res = run(art, "--out", tmp_path / "gpu.json", "--runs", "2", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "gpu.json").read_text())
    assert "no NVIDIA GPU" in rec["artifacts"][0]["gpu_unavailable_reason"]
    assert rec["installed"]["torch"] is None and rec["installed"]["gpu_absent_reason"]

    res = run(art, "--device", "cpu", "--out", tmp_path / "cpu.json", "--runs", "2", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    a = json.loads((tmp_path / "cpu.json").read_text())["artifacts"][0]
    assert a["gpu_vs_cpu"]["top1_agreement"] == 1.0 and a["gpu_vs_cpu"]["kld_mean"] < 1e-9
    assert a["gpu_vs_cpu"]["meets_goals"] and a["bench"]["decode_tok_s"] > 0
    assert a["bench"]["roofline"]["fraction"] > 0 and a["device"]["device"] == "cpu"
    assert run(tmp_path / "nothing").returncode == 2
