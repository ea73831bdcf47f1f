#!/usr/bin/env python3
"""Host memory of `edgemed compress`: peak RSS and wall time per model shape x recipe.

    python bench/bench_memory.py [--shapes tinyllama-11 tinyllama-22 mistral-7b]
                                 [--recipes int4 q4_k_m prune-width-25+q8_0]
                                 [--work /tmp/edgemed-memory] [--out bench/results/memory]
                                 [--low-memory] [--llama-cpp-reference]
                                 [--memory-cap-gb N [--plan-host-memory-gb M]]

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
honest; the plan's peak plus what it says parity maps, as RSS counts mapped pages) and the
artifact's parity against its parent (KLD mean, top-1) from its manifest. Beside peak RSS, the
peak of its anonymous part (RSS less file-backed pages): a GGUF artifact llama.cpp maps in parity
is page cache the kernel takes back under pressure, not memory compress needs.
`--low-memory` plans and runs `compress --low-memory` (the weights stay on disk).

`--memory-cap-gb N` runs each compress in a fresh memory cgroup capped at N GB (v2 or v1; needs
root): the test of that claim. Under the cap the kernel reclaims page cache (the written files, a
mapped artifact) instead of failing; recorded: the cgroup's own peak and how often it hit the cap.
The plans are checked against N GB (compress sees the cgroup's room itself), or against
`--plan-host-memory-gb M`, passed to compress as --host-memory-gb, where the plan would refuse.

`--llama-cpp-reference` adds, per shape, llama.cpp's own pipeline on the same checkpoint as the
yardstick for the q4_k_m rows' parity (a random-weight model's KLD depends on its shape, so a 7B's
cannot be compared with a 1.1B's): its converter (convert_hf_to_gguf.py from the llama-cpp-python
sdist, run in place as bench_cpu_frontier.py does, to BF16) and llama_model_quantize to Q4_K_M
(no imatrix), then KLD / top-1 against the parent over every position of edgemed's parity
prompts (prefill), the parent streamed from disk as compress --low-memory computes it.
`--recipes` with no names runs only that.

Writes results.json and results.md to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
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
    if name == "mistral-7b":  # in fp32 it would not fit this machine: write it shard by shard
        write_config_only(name, folder)
        write_streamed_checkpoint(folder, seed=0)
    else:
        build_replica(FIXTURE, folder, seed=0, sizes=sizes, dtype="bfloat16")
    print(f"wrote {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def write_streamed_checkpoint(folder: Path, seed: int = 0, shard_bytes: int = 2_000_000_000) -> None:
    """Random bf16 safetensors shards (+ index) for folder/config.json without building the model:
    each tensor is drawn on its own (2-D: normal(0, initializer_range), as the model's own init;
    1-D norms: ones) and a shard is written when it reaches shard_bytes, so memory is one shard."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    std = getattr(config, "initializer_range", 0.02)
    gen = torch.Generator().manual_seed(seed)
    shards, current, size, weight_map = [], {}, 0, {}
    params = list(model.state_dict().items())

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update(dict.fromkeys(current, name))
            current, size = {}, 0

    for key, p in params:
        if p.dim() >= 2:
            t = torch.empty(p.shape, dtype=torch.float32).normal_(0, std, generator=gen).to(torch.bfloat16)
        else:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        current[key] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    n = len(shards)
    for i, name in enumerate(shards):  # the hub's naming: model-0000i-of-0000n.safetensors
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (folder / name).rename(folder / final)
        weight_map = {k: (final if v == name else v) for k, v in weight_map.items()}
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def plan_host(folder: Path, recipes: list[str], low_memory: bool = False, host_memory_gb: float | None = None) -> dict:
    from edgemed.errors import EdgemedError
    from edgemed.pipeline import resolve
    from edgemed.plan import plan

    recipe, target = resolve(recipes, None)
    try:
        p = plan(str(folder), recipe, target, low_memory=low_memory, host_memory_gb=host_memory_gb)
    except EdgemedError as e:
        return {"feasible": False, "reasons": [str(e)]}
    host = p.host
    return {"feasible": host.feasible, "reasons": host.reasons, "fixes": p.fixes,
            "predicted_peak_gb": round(host.peak_ram_bytes / GB, 2), "predicted_disk_gb": round(host.disk_bytes / GB, 2),
            "predicted_mapped_gb": round(host.mapped_bytes / GB, 2),
            "host_memory_gb": round(host.memory_bytes / GB, 2), "plan_feasible": p.feasible}


@contextlib.contextmanager
def memory_cgroup(cap_gb: float | None):
    """A fresh memory cgroup capped at cap_gb (v2 under the unified mount, else v1's memory
    controller; needs write access to /sys/fs/cgroup), yielding a function that moves a process
    into it and one that reads its record: the peak it charged (anonymous memory and page cache)
    and how often it hit the cap; removed afterwards. None: no cgroup."""
    if cap_gb is None:
        yield (lambda pid: None), dict
        return
    root = Path("/sys/fs/cgroup")
    v2 = root / "cgroup.controllers" if (root / "cgroup.controllers").exists() else root / "unified/cgroup.controllers"
    if "memory" in (v2.read_text() if v2.exists() else ""):
        d, limit, peak, hits = v2.parent / f"edgemed-bench-{os.getpid()}", "memory.max", "memory.peak", "memory.events"
    else:
        d, limit, peak, hits = root / f"memory/edgemed-bench-{os.getpid()}", "memory.limit_in_bytes", \
            "memory.max_usage_in_bytes", "memory.failcnt"
    d.mkdir()
    try:
        (d / limit).write_text(str(int(cap_gb * GB)))

        def record() -> dict:
            text = (d / hits).read_text()
            hit = int(text) if text.strip().isdigit() else int(dict(x.split() for x in text.splitlines()).get("max", 0))
            try:  # memory.peak: cgroup v2 on Linux 5.19 and later
                top = round(int((d / peak).read_text()) / GB, 2)
            except OSError:
                top = None
            return {"memory_cap_gb": cap_gb, "cgroup_peak_gb": top, "cgroup_cap_hits": hit}

        yield (lambda pid: (d / "cgroup.procs").write_text(str(pid))), record
    finally:
        for _ in range(50):  # the child's exit leaves the cgroup empty a moment later
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run_compress(folder: Path, recipes: list[str], out: Path, low_memory: bool = False,
                 memory_cap_gb: float | None = None, host_memory_gb: float | None = None) -> dict:
    """`python -m edgemed compress` in a child process; peak RSS of its process tree (50 ms samples);
    with memory_cap_gb, in a memory cgroup capped so (memory_cgroup); host_memory_gb: compress's
    --host-memory-gb (what its plan checks against)."""
    import psutil

    cmd = [sys.executable, "-m", "edgemed", "compress", str(folder), "--output", str(out), "--overwrite"]
    for r in recipes:
        cmd += ["--recipe", r]
    if low_memory:
        cmd.append("--low-memory")
    if host_memory_gb:
        cmd += ["--host-memory-gb", str(host_memory_gb)]
    t0 = time.perf_counter()
    with memory_cgroup(memory_cap_gb) as (join, record):
        # The child joins the cgroup before it runs anything: everything it allocates is charged there.
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: join(os.getpid()))
        root = psutil.Process(proc.pid)
        peak = peak_anon = 0
        while proc.poll() is None:
            try:
                infos = [p.memory_info() for p in (root, *root.children(recursive=True))]
                peak = max(peak, sum(m.rss for m in infos))
                # Less the file-backed pages (a model file llama.cpp maps, shared libraries): clean page
                # cache the kernel can take back without swapping, where anonymous pages must stay.
                peak_anon = max(peak_anon, sum(m.rss - m.shared for m in infos))
            except psutil.Error:
                pass
            time.sleep(0.05)
        err = proc.stderr.read()
        row = {"exit_code": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
               "peak_rss_gb": round(peak / GB, 2), "peak_anon_gb": round(peak_anon / GB, 2), **record()}
    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        par = m.get("parity") or {}
        row.update({"status": m.get("status"), "kld_mean": par.get("kld_mean"), "top1_agreement": par.get("top1_agreement"),
                    "artifact_mb": round(sum(f["bytes"] for f in m.get("files", [])) / 1e6, 1)})
    if proc.returncode not in (0, 3):
        row["error"] = err.strip().splitlines()[-5:]
    return row


def llama_cpp_reference(folder: Path, work: Path) -> dict:
    """llama.cpp's own converter + Q4_K_M of the checkpoint in `folder`, and its parity on edgemed's
    parity prompts against the streamed parent (see the module's docstring)."""
    import bench_cpu_frontier as frontier
    import bench_roofline as roofline
    import llama_cpp
    import numpy as np

    from edgemed.models import load_model
    from edgemed.reference.metrics import compare_logits
    from edgemed.reference.parent import parent_parity_refs

    t0 = time.perf_counter()
    refs = parent_parity_refs(load_model(str(folder), low_memory=True))
    q = work / f"{folder.name}-llama-own-Q4_K_M.gguf"
    if not q.exists():
        src = frontier.llama_cpp_sdist(work)
        conv = roofline.converter_input(folder, work / f"{folder.name}-llama-converter")
        bf16 = q.with_name(q.stem + "-BF16.gguf")
        try:
            run = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(conv), "--outtype", "bf16",
                                  "--outfile", str(bf16)], capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"convert_hf_to_gguf.py failed: {run.stderr[-600:]}")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, os.cpu_count() or 1
            if llama_cpp.llama_model_quantize(str(bf16).encode(), str(q).encode(), params) != 0:
                q.unlink(missing_ok=True)
                raise RuntimeError("llama_model_quantize Q4_K_M failed")
        finally:
            bf16.unlink(missing_ok=True)
    own = frontier.LlamaCppFile(q, "llama.cpp's own Q4_K_M", [], 0)
    got = [own.logits(np.asarray(ids)) for ids in refs["ids"]]
    par = compare_logits(np.concatenate(refs["logits"]), np.concatenate(got))
    return {"kld_mean": par["kld_mean"], "top1_agreement": par["top1_agreement"], "positions": par["positions"],
            "artifact_mb": round(q.stat().st_size / 1e6, 1), "wall_s": round(time.perf_counter() - t0, 1),
            "exit_code": 0, "note": "reference, not edgemed: llama.cpp's converter + llama_model_quantize on the same "
                                    "checkpoint; KLD on the same parity prompts (prefill)"}


def to_markdown(rows: list[dict], commands: list[str]) -> str:
    import platform

    import psutil

    lines = ["# `edgemed compress` host memory", "",
             f"Machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / GB:.1f} GB RAM, "
             f"Python {platform.python_version()}. Commands, in order:", "",
             *[f"    {c}" for c in commands], "",
             "A row that did not run says why: the plan refused it on this host (its reason), or `--plan-only`.", "",
             "Anonymous: the peak of RSS less its file-backed pages (psutil's rss - shared: a model file llama.cpp "
             "maps, the shared libraries), which the kernel can reclaim without swap; recorded from the rows of "
             "2026-12-07's second session on. In a cgroup: the compress ran under that memory cap "
             "(--memory-cap-gb), where the kernel reclaims page cache rather than fail; plan / measured: the plan's "
             "peak plus what it says parity maps, over peak RSS.", "",
             "| shape | recipe | weights | plan: host peak (GB) | measured peak RSS (GB) | anonymous (GB) | plan / measured | "
             "wall (s) | KLD mean | top-1 | exit | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pred, meas = r.get("predicted_peak_gb"), r.get("peak_rss_gb")
        # RSS includes what is mapped (the GGUF artifact in parity), which the plan reports beside its peak.
        ratio = f"{(pred + (r.get('predicted_mapped_gb') or 0)) / meas:.2f}" if pred and meas else ""
        if r.get("ran"):
            note = "; ".join(n for n in (r.get("note"), (r.get("error") or [""])[-1]) if n)
        else:
            note = "; ".join(r.get("reasons") or []) or "plan only"
        kld = r.get("kld_mean")
        lines.append(f"| {r['shape']} | {r['recipe']} | {_mode(r)} | {pred if pred is not None else ''} | {meas or ''} | "
                     f"{r.get('peak_anon_gb') or ''} | {ratio} | "
                     f"{r.get('wall_s', '')} | {f'{kld:.4f}' if kld is not None else ''} | "
                     f"{r.get('top1_agreement') if r.get('top1_agreement') is not None else ''} | "
                     f"{r.get('exit_code', 'refused' if r.get('reasons') else '-')} | {note[:200]} |")
    by = {(r["shape"], r["recipe"], _mode(r)): r for r in rows if r.get("ran") and r.get("peak_rss_gb")}
    flat = []
    for (shape, recipe, mode), r11 in by.items():
        r22 = by.get(("tinyllama-22", recipe, mode))
        if shape != "tinyllama-11" or r22 is None:
            continue
        less = ""
        # GGUF's parity session (llama.cpp) maps the artifact; ONNX's runs the decoder a layer at a time.
        if r11.get("peak_anon_gb") and r22.get("peak_anon_gb"):
            less = f" (anonymous: {r22['peak_anon_gb'] / r11['peak_anon_gb']:.2f})"
        elif r11.get("artifact_mb") and r22.get("artifact_mb") and recipe.split("+")[-1].startswith("q"):
            a11, a22 = r11["artifact_mb"] / 1e3, r22["artifact_mb"] / 1e3
            less = (f" (less the artifact, which parity runs: {(r22['peak_rss_gb'] - a22) / (r11['peak_rss_gb'] - a11):.2f};"
                    f" the artifact grows {a22 / a11:.2f}x)")
        flat.append((f"{recipe} ({mode})", r22["peak_rss_gb"] / r11["peak_rss_gb"], less))
    if flat:
        lines += ["", "Peak RSS at 22 layers over 11 layers (the goal is <= 1.15, flat in depth): "
                  + ", ".join(f"{recipe} {ratio:.2f}{less}" for recipe, ratio, less in flat)
                  + ". In memory, compress holds the whole parent in fp32, so its peak grows with the model; "
                    "with --low-memory the weights stay on disk and are read one tensor at a time, and parity runs "
                    "an ONNX decoder one layer at a time (formats/onnx/layered.py) and maps a GGUF artifact, which "
                    "llama.cpp reads without repacking (file-backed pages: the anonymous ratio; the latest row of "
                    "each pair is used)."]
    return "\n".join(lines) + "\n"


def _mode(row: dict) -> str:
    if row.get("reference"):
        return "llama.cpp's converter (bf16 GGUF), on disk"
    cap = f", in a {row['memory_cap_gb']:g} GB cgroup" if row.get("memory_cap_gb") else ""
    return ("on disk (--low-memory)" if row.get("low_memory") else "in memory (fp32)") + cap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["tinyllama-11", "tinyllama-22", "mistral-7b"])
    ap.add_argument("--recipes", nargs="*", default=["int4", "q4_k_m", "prune-width-25+q8_0"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgemed-memory"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory"))
    ap.add_argument("--plan-only", action="store_true", help="record the plans, run no compress (no weights written)")
    ap.add_argument("--append", action="store_true", help="add the rows to an existing results.json (its commands kept)")
    ap.add_argument("--replan", action="store_true",
                    help="recompute every row's prediction in --out's results.json with the planner as it is now "
                         "(measurements kept; the prediction made at run time stays as predicted_at_run_gb)")
    ap.add_argument("--low-memory", action="store_true", help="plan and run compress --low-memory")
    ap.add_argument("--memory-cap-gb", type=float,
                    help="run each compress in a memory cgroup capped at this many GB (and plan for such a host): "
                         "what it needs, where RSS counts page cache the kernel can take back; needs root")
    ap.add_argument("--plan-host-memory-gb", type=float,
                    help="the host memory the plans are checked against (compress --host-memory-gb; default: the "
                         "cap, else this machine's available memory): to run a pair under a cap its plan refuses")
    ap.add_argument("--llama-cpp-reference", action="store_true",
                    help="add llama.cpp's own Q4_K_M of each shape's checkpoint and its parity, as a yardstick")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_memory.py " + " ".join(sys.argv[1:])
    rows, commands = [], [command]
    if (args.append or args.replan) and (args.out / "results.json").exists():
        old = json.loads((args.out / "results.json").read_text())
        rows, commands = old["rows"], old["commands"] + [command]
    if args.replan:
        for row in rows:
            if row.get("reference"):  # not an edgemed recipe: nothing to plan
                continue
            folder = write_config_only(row["shape"], args.work / f"{row['shape']}-config")
            p = plan_host(folder, row["recipe"].split("+"), bool(row.get("low_memory")))
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
        told = args.plan_host_memory_gb or args.memory_cap_gb
        plans = {r: plan_host(folder, r.split("+"), args.low_memory, told) for r in args.recipes}
        if any(p["feasible"] for p in plans.values()) and not args.plan_only:
            build_checkpoint(shape, folder)
        for recipe, p in plans.items():
            row = {"shape": shape, "recipe": recipe, **p, "ran": False, "low_memory": args.low_memory,
                   **({"memory_cap_gb": args.memory_cap_gb} if args.memory_cap_gb else {})}
            if args.plan_host_memory_gb:
                row["note"] = f"planned for a {args.plan_host_memory_gb:g} GB host (compress --host-memory-gb)"
            if p["feasible"] and not args.plan_only:
                print(f"compress {shape} {recipe} (plan: {p['predicted_peak_gb']} GB) ...", flush=True)
                out = args.work / f"{shape}-{recipe}{'-low' if args.low_memory else ''}"
                row.update(run_compress(folder, recipe.split("+"), out, args.low_memory, args.memory_cap_gb,
                                        args.plan_host_memory_gb), ran=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "results.json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=2))
            (args.out / "results.md").write_text(to_markdown(rows, commands))
        if args.llama_cpp_reference:
            build_checkpoint(shape, folder)
            rows.append({"shape": shape, "recipe": "llama.cpp's own Q4_K_M", "ran": True, "reference": True,
                         **llama_cpp_reference(folder, args.work)})
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "results.json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=2))
            (args.out / "results.md").write_text(to_markdown(rows, commands))
    print(to_markdown(rows, commands))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
