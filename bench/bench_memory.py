#!/usr/bin/env python3
"""Host memory of `edgemed compress`: peak RSS and wall time per model shape x recipe.

    python bench/bench_memory.py [--shapes tinyllama-11 tinyllama-22 mistral-7b]
                                 [--recipes int4 q4_k_m prune-width-25+q8_0]
                                 [--work /tmp/edgemed-memory] [--out bench/results/memory]

Shapes (random weights, stored in bfloat16 as real checkpoints ship; written with
edgemed.models.replica from the real Mistral-7B-Instruct-v0.2 files in tests/fixtures, so the
tokenizer's special tokens, template and vocabulary size (32,000) are real):

  tinyllama-N   TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 32/4 heads) with N layers
                (TinyLlama has 22); Mistral's architecture is Llama's with the same tensors.
  mistral-7b    Mistral-7B-v0.2 as LLaVA-Med v1.5 uses it (hidden 4096, 32 layers, 14.5 GB in bf16).

For every shape x recipe (a `+` composes recipes, as repeated --recipe does) the script first asks
`edgemed plan` (the host side: the peak RAM and disk compress needs here); a refused pair is
recorded with the planner's reason and no checkpoint is written for a shape whose every pair is
refused. Each accepted pair runs `python -m edgemed compress` in a child process while the parent
samples the RSS of the child's whole process tree every 50 ms (psutil); recorded: peak RSS, wall
time, exit code, the plan's predicted peak (predicted / measured is how the planner is kept
honest) and the artifact's parity against its parent (KLD mean, top-1) from its manifest.

Writes results.json and results.md to --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "checkpoints" / "mistral-7b-instruct-v0.2"
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4}
GB = 1e9


def shape_sizes(name: str) -> dict | None:
    """The replica sizes of a shape name; None: the fixture's own (full-size) config."""
    if name.startswith("tinyllama-"):
        return {**TINYLLAMA, "num_hidden_layers": int(name.split("-", 1)[1])}
    if name == "mistral-7b":
        return None
    raise SystemExit(f"unknown shape {name!r}: use tinyllama-N or mistral-7b")


def write_config_only(name: str, folder: Path) -> Path:
    """config.json (and the tokenizer files) of a shape, without weights: enough for `plan`."""
    from edgemed.models.replica import SIZES, _write_tokenizer, read_fixture, shrink

    folder.mkdir(parents=True, exist_ok=True)
    facts = read_fixture(FIXTURE)
    sizes = shape_sizes(name)
    cfg = shrink(facts["config"], {**SIZES, **sizes}) if sizes else dict(facts["config"])
    cfg["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_tokenizer(facts, folder)
    return folder


def build_checkpoint(name: str, folder: Path) -> Path:
    from edgemed.models.replica import build_replica

    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    sizes = shape_sizes(name)
    if sizes is None:  # the full 7B: the fixture's config as it is, in bf16
        from edgemed.models.replica import read_fixture

        sizes = {k: read_fixture(FIXTURE)["config"][k] for k in
                 ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
    t0 = time.perf_counter()
    build_replica(FIXTURE, folder, seed=0, sizes=sizes, dtype="bfloat16")
    print(f"wrote {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def plan_host(folder: Path, recipes: list[str]) -> dict:
    from edgemed.errors import EdgemedError
    from edgemed.pipeline import resolve
    from edgemed.plan import plan

    recipe, target = resolve(recipes, None)
    try:
        p = plan(str(folder), recipe, target)
    except EdgemedError as e:
        return {"feasible": False, "reasons": [str(e)]}
    host = p.host
    return {"feasible": host.feasible, "reasons": host.reasons, "fixes": p.fixes,
            "predicted_peak_gb": round(host.peak_ram_bytes / GB, 2), "predicted_disk_gb": round(host.disk_bytes / GB, 2),
            "host_memory_gb": round(host.memory_bytes / GB, 2), "plan_feasible": p.feasible}


def run_compress(folder: Path, recipes: list[str], out: Path) -> dict:
    """`python -m edgemed compress` in a child process; peak RSS of its process tree (50 ms samples)."""
    import psutil

    cmd = [sys.executable, "-m", "edgemed", "compress", str(folder), "--output", str(out), "--overwrite"]
    for r in recipes:
        cmd += ["--recipe", r]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    err = proc.stderr.read()
    row = {"exit_code": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak / GB, 2)}
    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        par = m.get("parity") or {}
        row.update({"status": m.get("status"), "kld_mean": par.get("kld_mean"), "top1_agreement": par.get("top1_agreement"),
                    "artifact_mb": round(sum(f["bytes"] for f in m.get("files", [])) / 1e6, 1)})
    if proc.returncode not in (0, 3):
        row["error"] = err.strip().splitlines()[-5:]
    return row


def to_markdown(rows: list[dict], commands: list[str]) -> str:
    import platform

    import psutil

    lines = ["# `edgemed compress` host memory", "",
             f"Machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / GB:.1f} GB RAM, "
             f"Python {platform.python_version()}. Commands, in order:", "",
             *[f"    {c}" for c in commands], "",
             "A row that did not run says why: the plan refused it on this host (its reason), or `--plan-only`.", "",
             "| shape | recipe | plan: host peak (GB) | measured peak RSS (GB) | plan / measured | wall (s) | "
             "KLD mean | top-1 | exit | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pred, meas = r.get("predicted_peak_gb"), r.get("peak_rss_gb")
        ratio = f"{pred / meas:.2f}" if pred and meas else ""
        if r.get("ran"):
            note = (r.get("error") or [""])[-1]
        else:
            note = "; ".join(r.get("reasons") or []) or "plan only"
        kld = r.get("kld_mean")
        lines.append(f"| {r['shape']} | {r['recipe']} | {pred if pred is not None else ''} | {meas or ''} | {ratio} | "
                     f"{r.get('wall_s', '')} | {f'{kld:.4f}' if kld is not None else ''} | "
                     f"{r.get('top1_agreement') if r.get('top1_agreement') is not None else ''} | "
                     f"{r.get('exit_code', 'refused' if r.get('reasons') else '-')} | {note[:200]} |")
    by = {(r["shape"], r["recipe"]): r.get("peak_rss_gb") for r in rows if r.get("ran")}
    flat = [(recipe, by[("tinyllama-22", recipe)] / by[("tinyllama-11", recipe)])
            for (shape, recipe) in by if shape == "tinyllama-11" and by.get(("tinyllama-22", recipe))]
    if flat:
        lines += ["", "Peak RSS at 22 layers over 11 layers (the goal is <= 1.15, flat in depth): "
                  + ", ".join(f"{recipe} {ratio:.2f}" for recipe, ratio in flat)
                  + ". compress holds the whole parent in fp32, so its peak grows with the model."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["tinyllama-11", "tinyllama-22", "mistral-7b"])
    ap.add_argument("--recipes", nargs="+", default=["int4", "q4_k_m", "prune-width-25+q8_0"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgemed-memory"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory"))
    ap.add_argument("--plan-only", action="store_true", help="record the plans, run no compress (no weights written)")
    ap.add_argument("--append", action="store_true", help="add the rows to an existing results.json (its commands kept)")
    ap.add_argument("--replan", action="store_true",
                    help="recompute every row's prediction in --out's results.json with the planner as it is now "
                         "(measurements kept; the prediction made at run time stays as predicted_at_run_gb)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_memory.py " + " ".join(sys.argv[1:])
    rows, commands = [], [command]
    if (args.append or args.replan) and (args.out / "results.json").exists():
        old = json.loads((args.out / "results.json").read_text())
        rows, commands = old["rows"], old["commands"] + [command]
    if args.replan:
        for row in rows:
            folder = write_config_only(row["shape"], args.work / f"{row['shape']}-config")
            p = plan_host(folder, row["recipe"].split("+"))
            row.setdefault("predicted_at_run_gb", row.get("predicted_peak_gb"))
            row["predicted_peak_gb"] = p.get("predicted_peak_gb")
            if not row.get("ran") and row.get("reasons"):
                row["reasons"] = p.get("reasons")  # the refusal as the planner words it now
        (args.out / "results.json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=2))
        (args.out / "results.md").write_text(to_markdown(rows, commands))
        print(to_markdown(rows, commands))
        return 0
    for shape in args.shapes:
        folder = args.work / shape
        write_config_only(shape, folder)
        plans = {r: plan_host(folder, r.split("+")) for r in args.recipes}
        if any(p["feasible"] for p in plans.values()) and not args.plan_only:
            build_checkpoint(shape, folder)
        for recipe, p in plans.items():
            row = {"shape": shape, "recipe": recipe, **p, "ran": False}
            if p["feasible"] and not args.plan_only:
                print(f"compress {shape} {recipe} (plan: {p['predicted_peak_gb']} GB) ...", flush=True)
                row.update(run_compress(folder, recipe.split("+"), args.work / f"{shape}-{recipe}"), ran=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "results.json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=2))
            (args.out / "results.md").write_text(to_markdown(rows, commands))
    print(to_markdown(rows, commands))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
