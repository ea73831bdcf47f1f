#!/usr/bin/env python3
"""GPU-machine check of a TensorRT artifact: build its engines, then compare TensorRT's logits with
ONNX Runtime's on the same Q/DQ ONNX graphs, through the prefill path and the KV-cache decode path.

Needs tensorrt (JetPack on a Jetson; NVIDIA's pip index on x86), cuda-python, and the runtime
extra (no torch). The artifact comes from the host (`edgemed compress ... --recipe trt-int8
--target jetson-orin-nano-8gb -o ART`); copy it to the device, then:

    python bench/trt_check.py ART [--copy-to DIR] [--rebuild] [--out trt_check.json]

--copy-to builds into a copy and leaves ART untouched. Exit 0: engines built and every comparison
within the thresholds; 1: a comparison failed; 2: no TensorRT / bad artifact. Writes a JSON record
(versions, power mode, build seconds, KLD / top-1 / max |dlogits| per prompt and path, vision
cosine, decode tok/s of both backends) and prints it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout without pip install

PROMPTS = ("Is there a pleural effusion on this chest radiograph?", "Describe the cardiac silhouette.")
# TensorRT picks its own kernels (fp16 accumulation, fused attention), so it is held to "same
# answer" thresholds against ONNX Runtime on the same graphs, not to bit-exactness.
MAX_KLD_MEAN = 0.02
MIN_TOP1 = 0.95


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--copy-to", type=Path, help="build into a copy of the artifact at this path")
    ap.add_argument("--rebuild", action="store_true", help="rebuild engines that already exist")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("trt_check.json"))
    args = ap.parse_args(argv)

    from edgemed.artifact import read_manifest, verify
    from edgemed.errors import EdgemedError
    from edgemed.formats.tensorrt.engine import build_engines
    from edgemed.calibration.builtin import synthetic_test_image
    from edgemed.reference.metrics import compare_logits
    from edgemed.reference.parity import cosine_rows
    from edgemed.formats.tensorrt.session import open_tensorrt

    art = args.artifact
    if args.copy_to:
        if args.copy_to.exists():
            shutil.rmtree(args.copy_to)
        shutil.copytree(art, args.copy_to)
        art = args.copy_to
    record: dict = {"artifact": str(art)}
    try:
        m = read_manifest(art)
        if args.rebuild or not (m.runtime.get("trt") or {}).get("engines"):
            t0 = time.perf_counter()
            build_engines(art, force=True, progress=lambda s: print(s, file=sys.stderr))
            record["build_total_s"] = round(time.perf_counter() - t0, 1)
        m = read_manifest(art)
        record["build"] = m.runtime["trt"]["build"]
        record["verify_problems"] = verify(art)
        trt_s = open_tensorrt(art, m, backend="tensorrt")
        ort_s = open_tensorrt(art, m, backend="onnxruntime")
    except EdgemedError as e:
        print(f"error {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)

    pv = trt_s.pixel_values(synthetic_test_image()) if trt_s.image else None
    ok = not record["verify_problems"]
    if pv is not None:
        cos = cosine_rows(ort_s.encode_image(pv), trt_s.encode_image(pv))
        record["vision_cosine_min"] = float(cos.min())
        ok &= record["vision_cosine_min"] > 0.99
    record["comparisons"] = []
    for i, prompt in enumerate(PROMPTS):
        with_image = pv is not None and i % 2 == 0
        ids = trt_s.prompt_ids(prompt, with_image)
        img = pv if with_image else None
        for path, kw in (("prefill", {}), ("decode", {"decode_from": max(1, len(ids) // 2)})):
            c = compare_logits(ort_s.logits(ids, img, **kw), trt_s.logits(ids, img, **kw))
            c.update(prompt=i, path=path)
            record["comparisons"].append(c)
            ok &= c["kld_mean"] <= MAX_KLD_MEAN and c["top1_agreement"] >= MIN_TOP1
    image = synthetic_test_image() if pv is not None else None
    for name, s in (("tensorrt", trt_s), ("onnxruntime", ort_s)):
        s.generate(image, PROMPTS[0], max_new_tokens=2, stop_at_eos=False)  # warm-up
        r = s.generate(image, PROMPTS[0], max_new_tokens=args.new_tokens, stop_at_eos=False)
        record[f"{name}_decode_tok_s"] = 1e3 / r.tpot_ms if r.tpot_ms else None
        record[f"{name}_ttft_ms"] = r.ttft_ms
        record[f"{name}_tokens"] = r.token_ids
    record["greedy_tokens_identical"] = record["tensorrt_tokens"] == record["onnxruntime_tokens"]
    record["thresholds"] = {"max_kld_mean": MAX_KLD_MEAN, "min_top1_agreement": MIN_TOP1}
    record["ok"] = bool(ok)
    args.out.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({k: v for k, v in record.items() if not k.endswith("_tokens")}, indent=2, default=str))
    trt_s.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
