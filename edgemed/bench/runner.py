"""`run_bench`: one artifact (or the PyTorch parent, through the same session API) on this host ->
report.json (DESIGN.md minimum fields), then report.md and PNG plots rendered from that JSON.

Torch-free: a session from ``edgemed.runtime.load`` is all it needs, so it runs on a Jetson with
the runtime extra. Every field that cannot be measured here is null with a
``*_unavailable_reason`` beside it; nothing is estimated in its place.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemed._version import __version__
from edgemed.artifact import Manifest, read_manifest, write_manifest
from edgemed.bench import meters
from edgemed.bench.suites import Item, iter_subgroup_keys, load_suite, parse_suite_spec, render_prompt_for, \
    template_sha256
from edgemed.errors import BadInputError

__all__ = ["run_bench", "run_suite", "LATENCY_PROMPT", "REPORT_SCHEMA_VERSION"]

REPORT_SCHEMA_VERSION = 1
LATENCY_PROMPT = "Describe the findings on this chest radiograph."
HEADLINE_METRIC = {"medqa": "mc_acc", "pubmedqa": "acc"}  # every other suite: closed_acc


def _has_image(session) -> bool:
    return getattr(session, "image", None) is not None


def _kv_bytes_per_element(session) -> int | None:
    """From the session when it says (an attribute, or the ONNX graph's KV input type)."""
    v = getattr(session, "kv_bytes_per_element", None)
    if v:
        return int(v)
    dtype = getattr(session, "_kv_dtype", None)
    return int(np.dtype(dtype).itemsize) if dtype is not None else None


def _on_accelerator(session) -> bool:
    choice = getattr(session, "device", None)
    if choice is not None and hasattr(choice, "device"):
        return choice.device == "cuda"
    for attr in ("decoder", "vision", "embed"):
        s = getattr(session, attr, None)
        if s is not None and hasattr(s, "get_providers"):
            return any(p != "CPUExecutionProvider" for p in s.get_providers()[:1])
    return bool(getattr(session, "on_accelerator", False) or getattr(session, "n_gpu_layers", 0))


# --------------------------------------------------------------------------------------------
# accuracy


def run_suite(session, suite: str, items: Sequence[Item], *, max_new_tokens: int = 32,
              progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy answers for every item and the suite's accuracy block; returns (block, predictions)."""
    from edgemed.bench import scoring
    from edgemed.reference.cache import hallucination_probe

    multimodal = _has_image(session)
    preds: list[dict[str, Any]] = []
    dropped_images = 0
    for n, it in enumerate(items):
        image = it.image if multimodal else None
        dropped_images += int(it.image is not None and not multimodal)
        res = session.generate(image, render_prompt_for(suite, it), max_new_tokens=max_new_tokens, stop_at_eos=True)
        rec = {"id": it.id, "pred": res.text, "answer_type": it.answer_type}
        if it.finding is not None:
            rec.update(finding=it.finding, normal=it.normal)
        preds.append(rec)
        if progress and n % 25 == 0:
            progress(f"{suite}: {n}/{len(items)}")
    records = [it.score_record(p["pred"]) for it, p in zip(items, preds)]
    block = scoring.summarize(records)
    metric = HEADLINE_METRIC.get(suite, "closed_acc")
    if suite == "pubmedqa":  # three labels: strict first-label match, plus macro-F1 over yes/no/maybe
        labels = ("yes", "no", "maybe")
        hits = [float(scoring.strict_closed(p["pred"], it.answer, labels)) for it, p in zip(items, preds)]
        block["acc"] = float(np.mean(hits))
        block["ci95"]["acc"] = list(scoring.bootstrap_ci(hits))
        block["n_by_metric"]["acc"] = len(hits)
        block["macro_f1"] = _macro_f1([it.answer for it in items], [p["pred"] for p in preds], labels)
    # DESIGN's minimum shape: ci95 is one [lo, hi] for the suite's headline metric; every
    # metric's interval stays in ci95_by_metric.
    block["ci95_by_metric"] = block.pop("ci95")
    block["headline_metric"] = metric
    block["headline"] = block.get(metric)
    block["ci95"] = block["ci95_by_metric"].get(metric)
    if block["ci95"] is None:
        block["ci95_unavailable_reason"] = f"no items scored by {metric}"
    block["prompt_template_sha256"] = template_sha256(suite)
    block["max_new_tokens"] = max_new_tokens
    if dropped_images:
        block["notes"] = [f"{dropped_images} items have images but the model is text-only: asked without them"]
    block["subgroups"] = {}  # score_record already carries modality and the subgroup attributes
    for key in iter_subgroup_keys(items):
        table = scoring.subgroups(records, key, "mc_acc" if metric == "mc_acc" else "closed_acc", min_n=5)
        if table["groups"]:
            block["subgroups"][key] = table
    probe_rows = [{"normal": it.normal, "finding": it.finding, "artifact": p["pred"]} for it, p in zip(items, preds)]
    if any(r["normal"] and r["finding"] for r in probe_rows):
        block["hallucination_probe"] = hallucination_probe(probe_rows)
    return block, preds


def _macro_f1(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> float:
    from edgemed.reference.cache import closed_label
    from edgemed.bench.scoring import normalize_answer

    g = [normalize_answer(x) for x in golds]
    p = [closed_label(x, labels) for x in preds]
    f1s = []
    for lab in labels:
        tp = sum(1 for a, b in zip(g, p) if a == lab and b == lab)
        fp = sum(1 for a, b in zip(g, p) if a != lab and b == lab)
        fn = sum(1 for a, b in zip(g, p) if a == lab and b != lab)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s))


# --------------------------------------------------------------------------------------------
# the benchmark


def choose_meter(meter, on_accelerator: bool, rapl_root: str | Path = "/sys/class/powercap"):
    """The meter that measures where the work runs. auto_meter prefers NVML, but NVML counts the
    GPU board only: for a session on the CPU that is the idle GPU, not the workload. Then use RAPL
    (the CPU package) if readable, else report energy as unavailable with both reasons."""
    from edgemed.bench.energy import NullMeter, NvmlMeter, RaplMeter

    if on_accelerator or not isinstance(meter, NvmlMeter):
        return meter
    rapl = RaplMeter(rapl_root, power_mode=meter.power_mode)
    reason = rapl.unavailable_reason()
    if reason is None:
        return rapl
    return NullMeter("the session runs on the CPU and this host's only energy counter is NVML, which "
                     f"measures the GPU board (not this workload); {reason}", power_mode=meter.power_mode)


def _fidelity_block(session, artifact_dir: Path | None, manifest: Manifest, is_parent: bool) -> dict[str, Any]:
    from edgemed.reference.cache import REFERENCE_FILE, compare_with_reference

    empty = {"kld_mean": None, "kld_p99": None, "top1_agreement": None, "answer_flip_rate": None}
    if is_parent:
        return {**empty, "fidelity_unavailable_reason": "this is the parent: fidelity is measured against it"}
    refs = [f.path for f in manifest.files if f.component == "reference"]
    if artifact_dir is None or not (refs or (artifact_dir / REFERENCE_FILE).exists()):
        return {**empty, "fidelity_unavailable_reason": "the artifact has no cached parent reference "
                "(made by an older edgemed): re-run compress, or run bench/compare.py beside the parent"}
    return compare_with_reference(session, artifact_dir / (refs[0] if refs else REFERENCE_FILE))


def run_bench(artifact: str | Path | None, suites: Sequence[str] = (), *, output: str | Path | None = None,
              runs: int = 10, warmup: int = 2, max_new_tokens: int = 32, suite_max_new_tokens: int = 32,
              limit: int | None = None, split: str | None = None, with_reports: Sequence[str | Path] = (),
              bandwidth_gb_s: float | None = None, energy_min_window_s: float = 1.0,
              session=None, manifest: Manifest | None = None,
              name: str | None = None, plots: bool = True, record_in_manifest: bool = True,
              verify: bool = True, allow_rejected: bool = False, device: str = "auto",
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark one artifact folder (or an already-open ``session`` with its ``manifest``, e.g.
    the PyTorch parent in bench/compare.py) and return the report dict; with ``output``, write
    report.json there and report.md plus PNG plots beside it.

    The artifact is checked first as edgemed.runtime.load checks it (``verify``: every sha256;
    ``allow_rejected``: run an artifact its gates rejected).
    ``device``: auto, cpu or cuda, as edgemed.runtime.load takes it; the report's "device" block says
    which ran, why, and what a GPU number needs beside it (GPU, driver, clocks, runtimes).
    ``suites``: ``NAME`` or ``NAME=PATH`` (see edgemed.bench.suites). ``runs`` latency requests
    after ``warmup`` unmeasured ones, each decoding exactly ``max_new_tokens`` tokens greedily.
    """
    from edgemed.bench.energy import auto_meter, energy_summary
    from edgemed.calibration.builtin import synthetic_test_image

    say = progress or (lambda m: None)
    if runs < 2:
        raise BadInputError("--runs", f"must be >= 2 for percentiles, got {runs}", "use 10 or more")
    if max_new_tokens < 2:
        raise BadInputError("--max-new-tokens", f"must be >= 2 (TPOT needs two tokens), got {max_new_tokens}",
                            "use 32")
    specs = [parse_suite_spec(s) for s in suites]  # fail on a bad name before loading anything
    artifact_dir = Path(artifact) if artifact is not None else None
    rss = meters.PeakRssSampler().start()
    t_load = time.perf_counter()
    if session is None:
        from edgemed.runtime import check_artifact, open_session

        if artifact_dir is None:
            raise BadInputError("artifact", "no artifact folder and no session given", "pass ARTIFACT")
        manifest = read_manifest(artifact_dir)
        check_artifact(artifact_dir, manifest, hashes=verify, allow_rejected=allow_rejected)
        session = open_session(artifact_dir, manifest, device=device)
    manifest = manifest or Manifest()
    load_s = time.perf_counter() - t_load
    is_parent = bool(getattr(session, "is_reference", False))  # the PyTorch parent itself
    name = name or (artifact_dir.name if artifact_dir is not None else getattr(manifest, "name", None) or "parent")

    # latency (and energy over exactly the measured requests)
    image = synthetic_test_image() if _has_image(session) else None
    say(f"latency: {warmup} warm-up + {runs} runs x {max_new_tokens} tokens")
    for _ in range(warmup):
        session.generate(image, LATENCY_PROMPT, max_new_tokens=max_new_tokens, stop_at_eos=False)
    meter = choose_meter(auto_meter(), _on_accelerator(session))
    measurable = meter.unavailable_reason() is None
    results, extra = [], []
    with meter:
        t0 = time.perf_counter()
        for _ in range(runs):
            results.append(session.generate(image, LATENCY_PROMPT, max_new_tokens=max_new_tokens, stop_at_eos=False))
        # Counters update every 20-100 ms (NVML) or are sampled (INA3221): a window of a few fast
        # requests reads nothing. Keep the same request going until the window is long enough;
        # these extra requests count for energy only, not for the latency percentiles.
        while measurable and time.perf_counter() - t0 < energy_min_window_s:
            extra.append(session.generate(image, LATENCY_PROMPT, max_new_tokens=max_new_tokens, stop_at_eos=False))
    latency = meters.latency_summary(results)
    latency.update(warmup=warmup, load_s=load_s, prompt=LATENCY_PROMPT, with_image=image is not None)
    window = results + extra
    energy = energy_summary(meter.reading, n_requests=len(window), n_tokens=sum(len(r.token_ids) for r in window))
    energy["window_requests"] = len(window)

    # accuracy
    accuracy: dict[str, Any] = {}
    predictions: dict[str, list] = {}
    for suite, source in specs:
        items = load_suite(suite, source, split=split, limit=limit)
        say(f"{suite}: {len(items)} items")
        block, preds = run_suite(session, suite, items, max_new_tokens=suite_max_new_tokens, progress=say)
        block.update(source=source or "hub", split=split or "default", limit=limit)
        accuracy[suite] = block
        predictions[suite] = preds

    say("fidelity against the cached parent reference")
    fidelity = _fidelity_block(session, artifact_dir, manifest, is_parent)
    if fidelity.get("closed_n"):
        accuracy["edgemed-gate"] = {
            "n": fidelity["closed_n"], "closed_acc": fidelity["closed_acc"], "open_recall": None,
            "ci95": fidelity["closed_acc_ci95"], "headline_metric": "closed_acc", "headline": fidelity["closed_acc"],
            "parent_closed_acc": fidelity.get("parent_closed_acc"),
            "closed_acc_retention": fidelity.get("closed_acc_retention"),
            "notes": ["built-in synthetic gate suite (edgemed.reference.cache.gate_items), not a clinical benchmark"],
        }

    # the roofline's 512 MB copy must not count as the artifact's memory: stop sampling first
    peak_rss = rss.stop()
    # roofline at the latency request's mean decode context
    ctx_tokens = (latency["prompt_tokens"] or 0) + (max_new_tokens - 1) / 2
    roof = meters.roofline(artifact_dir or Path("."), manifest, latency["decode_tok_s"], ctx_tokens,
                           on_accelerator=_on_accelerator(session), bandwidth_gb_s=bandwidth_gb_s,
                           kv_bytes_per_element=_kv_bytes_per_element(session))

    accel_mb, accel_reason = meters.accelerator_memory()
    sizes = meters.artifact_mb(manifest, artifact_dir)
    memory = {"peak_rss_mb": peak_rss, "peak_accel_mb": accel_mb, "artifact_mb": sizes["artifact_mb"],
              "reference_mb": sizes["reference_mb"],
              "peak_rss_note": "whole process, sampled every 5 ms from session load to the end of the bench"}
    if accel_reason:
        memory["peak_accel_mb_unavailable_reason"] = accel_reason
        memory["peak_accel_note"] = "NVML reports current, not peak, use: read at the end of the bench"
    else:
        memory["peak_accel_note"] = "NVML per-process use at the end of the bench (NVML keeps no peak)"

    target = manifest.target or {}
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "edgemed_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "artifact": {"name": name, "path": str(artifact_dir) if artifact_dir else None,
                     "format": manifest.format, "recipe": manifest.recipe.get("name"),
                     "status": manifest.status, "model": manifest.source.model if manifest.source else None},
        "target": {"name": target.get("name"), "memory_bandwidth_gb_s": target.get("memory_bandwidth_gb_s"),
                   "memory_gb": target.get("memory_gb")} if target else None,
        "host": meters.host_info(),
        "device": meters.device_info(session),
        "latency": latency,
        "memory": memory,
        "energy": energy,
        "roofline": roof,
        "fidelity": fidelity,
        "accuracy": accuracy,
        "predictions": predictions,
        "decoding": {"strategy": "greedy", "latency_max_new_tokens": max_new_tokens,
                     "suite_max_new_tokens": suite_max_new_tokens},
    }
    if not target:
        report["target_unavailable_reason"] = "no target recorded (not an edgemed artifact)"
    if output is not None:
        write_report(report, output, with_reports=with_reports, plots=plots)
    if record_in_manifest and artifact_dir is not None and not is_parent:
        _record_results(artifact_dir, report, output)
    return report


def _record_results(artifact_dir: Path, report: dict, output) -> None:
    """manifest.results = the latest bench summary (DESIGN.md). A read-only artifact is fine."""
    lat, fid = report["latency"], report["fidelity"]
    summary = {"created_utc": report["created_utc"], "host": report["host"]["cpu"], "report": str(output) if output else None,
               "ttft_ms_p50": lat["ttft_ms"]["p50"], "decode_tok_s": lat["decode_tok_s"],
               "peak_rss_mb": report["memory"]["peak_rss_mb"], "kld_mean": fid.get("kld_mean"),
               "answer_flip_rate": fid.get("answer_flip_rate"),
               "accuracy": {k: v.get("headline") for k, v in report["accuracy"].items()}}
    try:
        m = read_manifest(artifact_dir)
        m.results = summary
        write_manifest(artifact_dir, m)
    except OSError as e:
        report.setdefault("notes", []).append(f"manifest.results not updated ({e})")


def write_report(report: dict, output: str | Path, *, with_reports: Sequence[str | Path] = (),
                 plots: bool = True) -> dict[str, Path]:
    """report.json at ``output``; report.md, pareto.png and ttft.png beside it."""
    from edgemed.bench import report as render

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    others = [json.loads(Path(p).read_text()) for p in with_reports]
    written = {"json": out}
    if plots:
        written.update(render.plots(report, others, out.parent))
    else:
        report["plots"] = {"plots_unavailable_reason": "plots not requested"}
    out.write_text(json.dumps(report, indent=2, default=_json_default))
    md = out.with_suffix(".md") if out.name != "report.json" else out.parent / "report.md"
    md.write_text(render.markdown(report))
    written["md"] = md
    return written


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
