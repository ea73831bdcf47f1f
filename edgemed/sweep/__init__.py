"""`edgemed sweep`: every recipe x target pair planned, each distinct artifact compressed once and
benched on this host, one row per pair, and per target the smallest artifact that passes every gate.

    plan every pair (refused ones keep the planner's reason)
      -> group feasible pairs by the artifact they need (two targets with the same format and
         layout share one: GGUF files are the same for every target, an ONNX graph differs between
         the fp32 CPU layout and the fp16 GPU layout, TensorRT builds per target)
      -> one job per artifact (jobs.run_job) on Ray or a local process pool, scheduled by the
         plan's host RAM, resumable (a verified artifact and its report are not redone)
      -> rows, sweep.json, sweep.md, a Pareto plot per target (report.py)

Artifacts and reports go to OUT/artifacts/<recipe>--<target> and OUT/reports/...; Ray workers must
see OUT at the same path (shared storage): artifacts are not copied between nodes.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgemed.errors import BadInputError, EdgemedError

__all__ = ["sweep", "plan_pairs"]

SWEEP_SCHEMA_VERSION = 1


def _engine(engine: str) -> str:
    from edgemed.sweep.jobs import ENGINES

    if engine == "auto":
        return "ray" if importlib.util.find_spec("ray") is not None else "process"
    if engine not in ENGINES:
        raise BadInputError("--engine", f"'{engine}' is not an engine", f"use auto, {', '.join(ENGINES)}")
    if engine == "ray" and importlib.util.find_spec("ray") is None:
        raise BadInputError("--engine ray", "Ray is not installed", "pip install 'edgemed[sweep]', or --engine process")
    return engine


def plan_pairs(model: str, recipes: Sequence[str], targets: Sequence[str],
               host_memory_gb: float | None = None) -> list[dict[str, Any]]:
    """One entry per recipe x target: the plan, whether it is feasible and why not, and the
    artifact it needs (`artifact`: pairs with the same value share one). A recipe spec may compose
    recipes with `+` (prune-width-25+q8_0). Bad recipe or target names raise BadInputError."""
    from edgemed.formats.base import backend_for
    from edgemed.pipeline import resolve
    from edgemed.plan import plan

    rows = []
    layouts: dict[tuple, str] = {}
    for spec in recipes:
        for target in targets:
            recipe, tgt = resolve(spec.split("+"), target)
            try:
                p = plan(model, recipe, tgt, host_memory_gb=host_memory_gb)
            except EdgemedError as e:  # e.g. a family the format cannot hold: a refusal, not a crash
                rows.append({"recipe": spec, "target": tgt.name, "feasible": False, "reasons": [str(e)],
                             "plan": None, "artifact": None})
                continue
            backend = backend_for(recipe, tgt)
            layout = (spec, p.format, tuple((n, c.precision, round(c.bits_per_weight, 4)) for n, c in p.components.items()),
                      p.kv_bytes_per_element, tgt.name if backend.target_specific else "")
            artifact = layouts.setdefault(layout, f"{spec}--{tgt.name}") if p.feasible else None
            rows.append({"recipe": spec, "target": tgt.name, "feasible": p.feasible, "reasons": list(p.reasons),
                         "plan": p.to_dict(), "artifact": artifact,
                         "host_bytes": p.host.peak_ram_bytes if p.host else 0})
    return rows


def sweep(model: str | None, recipes: Sequence[str], targets: Sequence[str], out: str | Path, *,
          suites: Sequence[str] = (), jobs: int = 1, engine: str = "auto", ray_address: str | None = None,
          host_memory_gb: float | None = None, runs: int = 5, max_new_tokens: int = 16, limit: int | None = None,
          progress: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Run the sweep (see the module docstring) and return what sweep.json holds.

    engine: "auto" (Ray when installed, else a process pool), "ray" (`ray_address` for a cluster,
    else a local Ray instance with `jobs` CPUs), "process". progress(kind, payload) is called with
    ("planned", pair), ("start", job) and ("end", result)."""
    from edgemed.demo import resolve_model
    from edgemed.plan import host_memory_available
    from edgemed.sweep.jobs import run_jobs
    from edgemed.sweep.report import build_rows, write_outputs

    if not recipes or not targets:
        raise BadInputError("sweep", "needs at least one --recipe and one --target", "e.g. --recipe int4 --target cpu-x86-avx2")
    if jobs < 1:
        raise BadInputError("--jobs", f"must be >= 1, got {jobs}", "use 1 (one job at a time) or more")
    emit = progress or (lambda kind, payload: None)
    from edgemed.bench.suites import parse_suite_spec

    for s in suites:
        parse_suite_spec(s)  # a bad suite name fails before any compress
    engine = _engine(engine)
    out = Path(out).resolve()
    source = resolve_model(model)
    pairs = plan_pairs(source, recipes, targets, host_memory_gb)
    for pair in pairs:
        emit("planned", pair)

    groups: dict[str, list[dict]] = {}
    for pair in pairs:
        if pair["artifact"]:
            groups.setdefault(pair["artifact"], []).append(pair)
    job_list = []
    for key, members in groups.items():
        first = members[0]
        job_list.append({
            "key": key, "model": source, "recipes": first["recipe"].split("+"), "target": first["target"],
            "artifact": str(out / "artifacts" / key), "report": str(out / "reports" / f"{key}.json"),
            "suites": list(suites), "runs": runs, "max_new_tokens": max_new_tokens, "limit": limit,
            "host_memory_gb": host_memory_gb, "host_bytes": max(m["host_bytes"] for m in members),
        })
    budget = int((host_memory_gb * 1e9) if host_memory_gb else host_memory_available()) * 95 // 100
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    results = {r["key"]: r for r in run_jobs(job_list, engine, jobs, budget, ray_address, emit)}
    rows = build_rows(pairs, {j["key"]: j for j in job_list}, results)
    summary = {"schema_version": SWEEP_SCHEMA_VERSION, "model": source, "recipes": list(recipes),
               "targets": list(targets), "suites": list(suites), "engine": engine, "jobs": jobs,
               "ray_address": ray_address, "rows": rows}
    write_outputs(summary, out)
    return summary


def load_sweep(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "sweep.json").read_text())
