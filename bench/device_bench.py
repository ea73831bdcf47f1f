#!/usr/bin/env python3
"""Benchmark one artifact on this device and save the report (JSON, Markdown, plots).

Needs only the runtime extra plus psutil (no torch), so it runs on a Jetson next to the artifact:

    python bench/device_bench.py ARTIFACT [--suite vqa-rad=/data/vqa-rad] [--runs 20] [--out DIR]

Prints a one-screen JSON summary and writes DIR/report.json, report.md, pareto.png, ttft.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout without pip install


def summary(report: dict) -> dict:
    lat, mem, en, roof, fid = (report[k] for k in ("latency", "memory", "energy", "roofline", "fidelity"))
    return {
        "artifact": report["artifact"]["name"], "host": report["host"]["cpu"],
        "accelerator": report["host"]["accelerator"],
        "ttft_ms": lat["ttft_ms"], "tpot_ms": lat["tpot_ms"], "decode_tok_s": lat["decode_tok_s"],
        "prefill_tok_s": lat["prefill_tok_s"], "vision_encode_ms_p50": lat["vision_encode_ms"]["p50"],
        "peak_rss_mb": mem["peak_rss_mb"], "peak_accel_mb": mem["peak_accel_mb"], "artifact_mb": mem["artifact_mb"],
        "joules_per_token": en["joules_per_token"], "energy_unavailable_reason": en.get("energy_unavailable_reason"),
        "power_mode": en.get("power_mode"),
        "roofline_fraction": roof.get("fraction"), "decode_ceiling_tok_s": roof.get("decode_ceiling_tok_s"),
        "kld_mean": fid.get("kld_mean"), "top1_agreement": fid.get("top1_agreement"),
        "answer_flip_rate": fid.get("answer_flip_rate"),
        "accuracy": {k: {"n": v["n"], v.get("headline_metric") or "value": v.get("headline"), "ci95": v.get("ci95")}
                     for k, v in report["accuracy"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--suite", action="append", default=[], help="NAME or NAME=PATH; repeatable")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default ./device-bench-<artifact>)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--split", default=None)
    ap.add_argument("--bandwidth-gb-s", type=float, default=None)
    args = ap.parse_args(argv)

    from edgemed.bench.runner import run_bench
    from edgemed.errors import EdgemedError

    out = args.out or Path(f"device-bench-{args.artifact.resolve().name}")
    try:
        report = run_bench(args.artifact, args.suite, output=out / "report.json", runs=args.runs, warmup=args.warmup,
                           max_new_tokens=args.max_new_tokens, limit=args.limit, split=args.split,
                           bandwidth_gb_s=args.bandwidth_gb_s, progress=lambda m: print(m, file=sys.stderr))
    except EdgemedError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    s = summary(report)
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    print(json.dumps(s, indent=2))
    print(f"wrote {out / 'report.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
