#!/usr/bin/env python3
"""Whole-VLM size against fp16: the demo compressed (measured), a LLaVA-1.5-7B planned.

    python bench/bench_size.py [--recipes q4_k_m iq4_xs iq4_xs-tied int4 int4-fast]
                               [--plan-model tests/fixtures/checkpoints/llava-1.5-7b-hf]
                               [--plan-recipes q4_k_m iq4_xs int4] [--plan-targets cpu-x86-avx2 jetson-orin-nx-16gb]
                               [--out bench/results/size]

fp16 size: 2 bytes for every parameter of the vision tower, projector, embedding table, language
model and lm_head (a tied lm_head is the embedding table: counted once), what a checkpoint saved
in fp16 holds. Artifact size: the bytes of the artifact's weight files (GGUF, ONNX graphs and their
external data), from its manifest; tokenizer, imatrix, parity references and other support files
are not weights and are left out. The demo (edgemed-demo-cxr) is compressed with each --recipes
(cached in --work) and its parity KLD against the parent is reported beside the ratio; the 7B is
planned (`edgemed plan`, whose GGUF sizes follow llama.cpp's own mixtures and fallbacks, and which
matched the 4.37 GB q4_k_m artifact of bench_memory.py's Mistral-7B shape). `iq4_xs-tied` is
written here: iq4_xs with the tied embedding/output table at iq4_xs too (the shipped iq4_xs keeps it
at Q6_K, which SmolLM2's 576-wide rows turn into Q8_0: a fifth of the demo's bytes).
Writes results.json and results.md with the command.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NOT_WEIGHTS = {"support", "imatrix", "reference", "calibration", "trt-profiles", None}
GOAL = 0.32


def fp16_bytes(model: str, target: str) -> int:
    """2 bytes per parameter, a tied lm_head counted once: from the plan of a GGUF recipe (GGUF
    stores a tied table once and the plan notes it; ONNX graphs hold the lm_head as its own tensor)."""
    from edgemed.pipeline import resolve
    from edgemed.plan import plan

    comps = plan(model, *resolve(["q8_0"], target), host_memory_gb=1024).to_dict()["components"]
    return sum(2 * c["params"] for name, c in comps.items()
               if not (name == "lm_head" and "tied" in (c.get("note") or "")))


def extra_recipes(work: Path) -> dict[str, Path]:
    import yaml

    from edgemed.recipe import load_recipe

    r = load_recipe("iq4_xs").model_dump(mode="json", exclude_defaults=True)
    r["name"] = "iq4_xs-tied"
    r["description"] = "iq4_xs with the tied embedding / output table at iq4_xs too (bench_size.py)"
    r["policy"]["lm_head"] = "iq4_xs"
    path = work / "iq4_xs-tied.yaml"
    path.write_text(yaml.safe_dump(r))
    return {"iq4_xs-tied": path}


def demo_row(recipe: str, recipe_arg: str, work: Path, target: str) -> dict:
    from edgemed.demo import resolve_model
    from edgemed.errors import GateFailedError
    from edgemed.pipeline import compress, resolve
    from edgemed.plan import plan

    out = work / f"demo-{recipe}"
    if not (out / "manifest.json").exists():
        t0 = time.perf_counter()
        try:
            compress("edgemed-demo-cxr", [recipe_arg], target, out)
        except GateFailedError:
            pass  # sized anyway; the verdict is in the manifest
        print(f"built {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    m = json.loads((out / "manifest.json").read_text())
    weights = {f["path"]: f["bytes"] for f in m["files"] if f.get("component") not in NOT_WEIGHTS}
    p = plan(resolve_model("edgemed-demo-cxr"), *resolve([recipe_arg], target)).to_dict()
    fp16 = fp16_bytes(resolve_model("edgemed-demo-cxr"), target)
    total = sum(weights.values())
    return {"model": "edgemed-demo-cxr", "recipe": recipe, "target": target, "measured": True,
            "artifact_bytes": total, "weight_files": weights, "planned_bytes": round(p["artifact_mb"] * 1e6),
            "fp16_bytes": fp16, "ratio_vs_fp16": total / fp16, "status": m["status"],
            "kld_mean": (m.get("parity") or {}).get("kld_mean"),
            "top1_agreement": (m.get("parity") or {}).get("top1_agreement")}


def plan_row(model: str, recipe: str, target: str) -> dict:
    from edgemed.pipeline import resolve
    from edgemed.plan import plan

    p = plan(model, *resolve([recipe], target), host_memory_gb=1024).to_dict()
    fp16 = fp16_bytes(model, target)
    art = round(p["artifact_mb"] * 1e6)
    return {"model": Path(model).name, "recipe": recipe, "target": target, "measured": False,
            "artifact_bytes": art, "fp16_bytes": fp16, "ratio_vs_fp16": art / fp16,
            "components_mb": {k: c["mb"] for k, c in p["components"].items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=["q4_k_m", "iq4_xs", "iq4_xs-tied", "int4", "int4-fast"])
    ap.add_argument("--target", default="cpu-x86-avx2")
    ap.add_argument("--plan-model", default="tests/fixtures/checkpoints/llava-1.5-7b-hf")
    ap.add_argument("--plan-recipes", nargs="*", default=["q4_k_m", "iq4_xs", "iq4_xs-tied", "int4", "int4-fast"])
    ap.add_argument("--plan-targets", nargs="*", default=["cpu-x86-avx2", "jetson-orin-nx-16gb"])
    ap.add_argument("--out", type=Path, default=Path("bench/results/size"))
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/edgemed/bench-size")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = extra_recipes(args.work)
    rows = [demo_row(r, str(extra.get(r, r)), args.work, args.target) for r in args.recipes]
    for t in args.plan_targets:
        rows += [plan_row(args.plan_model, str(extra.get(r, r)), t) | {"recipe": r} for r in args.plan_recipes]
    for r in rows:
        r["meets_goal"] = r["ratio_vs_fp16"] <= GOAL
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    (args.out / "results.json").write_text(json.dumps({"command": cmd, "goal_ratio": GOAL, "rows": rows}, indent=2))
    lines = ["| model | recipe | target | how | artifact MB | fp16 MB | x fp16 | <= 0.32 | KLD mean | top-1 |",
             "|---|---|---|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        kld = f"{r['kld_mean']:.4g}" if r.get("kld_mean") is not None else ""
        top1 = f"{r['top1_agreement']:.3f}" if r.get("top1_agreement") is not None else ""
        lines.append(f"| {r['model']} | {r['recipe']} | {r['target']} | {'measured' if r['measured'] else 'planned'} | "
                     f"{r['artifact_bytes'] / 1e6:.1f} | {r['fp16_bytes'] / 1e6:.1f} | {r['ratio_vs_fp16']:.3f} | "
                     f"{'yes' if r['meets_goal'] else 'no'} | {kld} | {top1} |")
    table = "\n".join(lines)
    (args.out / "results.md").write_text(f"# Whole-VLM size against fp16\n\n`{cmd}`\n\n{table}\n\n"
                                         "Artifact: weight files only (GGUF / ONNX and external data); fp16: 2 bytes per "
                                         "parameter of vision, projector, embeddings, language model and an untied "
                                         "lm_head. KLD: the artifact's parity against its PyTorch parent "
                                         "(manifest parity, every position of the parity prompts).\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
