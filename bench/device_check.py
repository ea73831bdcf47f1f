#!/usr/bin/env python3
"""One prepared check of edgemed's GPU path, run on a GPU machine next to artifacts copied in.

    python bench/device_check.py ARTIFACT [ARTIFACT ...] [--out device_check.json]
        [--reference-gguf llama.cpp-own.gguf] [--runs 10] [--max-new-tokens 64]

1. What is installed: the GPU, driver, CUDA, clocks and power limit (NVML), the Jetson power mode,
   onnxruntime and its providers, llama-cpp-python and whether it offloads, tensorrt, torch.
2. Per artifact (no compress: it needs only the runtime extra, no torch): the same artifact opened
   on the CPU and on the GPU (ONNX Runtime's CUDA provider, llama.cpp with every layer offloaded,
   TensorRT engines), logits compared at every position of the parity prompts, through the
   prefill and the KV-cache decode path (KLD, top-1 agreement; goals: top-1 >= 0.99, KLD <= 1e-3),
   then `edgemed bench` on the GPU session: TTFT, decode tok/s, memory, energy, roofline fraction.
3. `--reference-gguf`: llama.cpp's own converted file of the same model at the same type, timed
   the same way beside the artifact (decode tok/s, bytes per token, roofline fraction).

Writes one JSON (default ./device_check.json) and prints a summary; exit 0 when every check ran
and met its goals, 1 when one missed, 2 on bad input (a missing artifact). A check that cannot run
here (no GPU, no GPU build of a runtime) is recorded with its reason, not failed.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout without pip install

GOALS = {"top1_agreement_min": 0.99, "kld_mean_max": 1e-3}


def installed() -> dict:
    from edgemed import __version__
    from edgemed.bench import meters
    from edgemed.runtime.device import gpu_absent_reason

    out = {"python": platform.python_version(), "machine": platform.machine(), "edgemed": __version__,
           "gpu_absent_reason": gpu_absent_reason(), "host": meters.host_info(),
           "device": meters.device_info(None)}
    try:
        import torch

        out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "cuda_available": torch.cuda.is_available()}
    except ImportError:
        out["torch"] = None
    return out


def logits_agreement(cpu, gpu) -> dict:
    """CPU session vs GPU session of one artifact on the parity prompts, every position, through
    prefill and through the decode path (decode_from = half the prompt)."""
    import numpy as np

    from edgemed.calibration.builtin import PARITY_PROMPTS, synthetic_test_image
    from edgemed.reference.metrics import compare_logits

    pv = grid = None
    if getattr(cpu, "image", None) is not None:
        image = synthetic_test_image()
        pv, grid = cpu.pixel_values(image), cpu.image_grid(image)
    ref, got = [], []
    for i, prompt in enumerate(PARITY_PROMPTS):
        with_image = pv is not None and i % 2 == 0
        ids = cpu.prompt_ids(prompt, with_image, grid if with_image else (0, 0))
        image_in = pv if with_image else None
        for decode_from in (None, max(1, len(ids) // 2)):
            ref.append(cpu.logits(ids, image_in, decode_from=decode_from))
            got.append(gpu.logits(ids, image_in, decode_from=decode_from))
    out = compare_logits(np.concatenate(ref), np.concatenate(got))
    out["meets_goals"] = out["top1_agreement"] >= GOALS["top1_agreement_min"] and out["kld_mean"] <= GOALS["kld_mean_max"]
    return out


def check_artifact(path: Path, runs: int, max_new_tokens: int, bandwidth_gb_s: float | None,
                   device: str = "cuda") -> dict:
    from edgemed.artifact import read_manifest
    from edgemed.bench import run_bench
    from edgemed.errors import BadInputError, MissingDependencyError
    from edgemed.runtime import check_artifact as verify, open_session

    manifest = read_manifest(path)
    verify(path, manifest, allow_rejected=True)
    rec: dict = {"artifact": str(path), "format": manifest.format, "recipe": manifest.recipe.get("name"),
                 "target": (manifest.target or {}).get("name")}
    try:
        gpu = open_session(path, manifest, device=device)
    except (BadInputError, MissingDependencyError) as e:
        rec["gpu_unavailable_reason"] = str(e)
        return rec
    rec["device"] = gpu.device.record()
    cpu = open_session(path, manifest, device="cpu")
    t = time.perf_counter()
    rec["gpu_vs_cpu"] = logits_agreement(cpu, gpu)
    rec["gpu_vs_cpu"]["seconds"] = time.perf_counter() - t
    del cpu
    report = run_bench(path, session=gpu, manifest=manifest, runs=runs, max_new_tokens=max_new_tokens,
                       bandwidth_gb_s=bandwidth_gb_s, plots=False, record_in_manifest=False)
    lat, roof = report["latency"], report["roofline"]
    rec["bench"] = {"ttft_ms": lat["ttft_ms"], "tpot_ms": lat["tpot_ms"], "decode_tok_s": lat["decode_tok_s"],
                    "prefill_tok_s": lat["prefill_tok_s"], "memory": report["memory"], "energy": report["energy"],
                    "roofline": roof, "fidelity_vs_parent": report["fidelity"], "device": report["device"]}
    return rec


def reference_gguf(path: Path, runs: int, max_new_tokens: int, bandwidth_gb_s: float | None) -> dict:
    """llama.cpp's own file of the same model and type, all layers offloaded, F16 KV (its default),
    timed with the same prompt length and token count as the artifact's bench."""
    import gguf
    import llama_cpp
    import numpy as np

    from edgemed.bench.runner import LATENCY_PROMPT

    if not path.is_file():
        return {"path": str(path), "unavailable_reason": "no such file"}
    weights = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")
    llm = llama_cpp.Llama(model_path=str(path), n_gpu_layers=-1, n_ctx=1024, verbose=False)
    prompt = llm.tokenize(LATENCY_PROMPT.encode(), add_bos=True)
    rates = []
    for i in range(runs + 2):
        llm.reset()
        llm.eval(prompt)
        t = time.perf_counter()
        for _ in range(max_new_tokens):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        if i >= 2:  # two warm-ups
            rates.append(max_new_tokens / (time.perf_counter() - t))
    rate = float(np.median(rates))
    out = {"path": str(path), "decode_tok_s": rate, "decode_tok_s_runs": rates, "weight_bytes_per_token": weights,
           "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}
    if bandwidth_gb_s:
        out["roofline_fraction"] = rate * weights / (bandwidth_gb_s * 1e9)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", type=Path, nargs="*")
    ap.add_argument("--out", type=Path, default=Path("device_check.json"))
    ap.add_argument("--reference-gguf", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="where the checked session runs (cpu: a dry run of the whole script on a machine without a GPU)")
    ap.add_argument("--bandwidth-gb-s", type=float, default=None,
                    help="the GPU's memory bandwidth for the roofline (default: the artifact's target spec)")
    args = ap.parse_args(argv)
    from edgemed.errors import BadInputError

    missing = [str(a) for a in args.artifacts if not (a / "manifest.json").is_file()]
    if missing:
        print(f"error: not an edgemed artifact (no manifest.json): {', '.join(missing)}", file=sys.stderr)
        return 2
    result = {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "goals": GOALS,
              "installed": installed(), "artifacts": []}
    failed = False
    for path in args.artifacts:
        try:
            rec = check_artifact(path, args.runs, args.max_new_tokens, args.bandwidth_gb_s, args.device)
        except BadInputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        failed |= not rec.get("gpu_vs_cpu", {}).get("meets_goals", True)
        result["artifacts"].append(rec)
        print(json.dumps({k: rec.get(k) for k in ("artifact", "gpu_unavailable_reason")} | {
            "top1": rec.get("gpu_vs_cpu", {}).get("top1_agreement"), "kld": rec.get("gpu_vs_cpu", {}).get("kld_mean"),
            "decode_tok_s": rec.get("bench", {}).get("decode_tok_s"),
            "roofline_fraction": rec.get("bench", {}).get("roofline", {}).get("fraction")}))
    if args.reference_gguf:
        result["reference_gguf"] = reference_gguf(args.reference_gguf, args.runs, args.max_new_tokens, args.bandwidth_gb_s)
        print(json.dumps({k: v for k, v in result["reference_gguf"].items() if k != "decode_tok_s_runs"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
