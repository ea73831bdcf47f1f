"""report.md and PNG plots, rendered from report.json dicts only (JSON first, then views).

matplotlib is optional (the ``bench`` extra): without it the plots are skipped and report.json
says why under ``plots.plots_unavailable_reason``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown", "plots", "pareto_front", "comparison_markdown", "headline"]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both speed (x) and accuracy (y)."""
    front = []
    for name, x, y in points:
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for _, x2, y2 in points):
            front.append(name)
    return front


def headline(report: dict) -> tuple[str | None, float | None]:
    """(label, value) for the accuracy axis of the Pareto plot: the first real suite's headline,
    else the gate suite's closed accuracy, else top-1 agreement with the parent."""
    acc = report.get("accuracy") or {}
    for name in [k for k in acc if k != "edgemed-gate"] + [k for k in acc if k == "edgemed-gate"]:
        v = acc[name].get("headline")
        if v is not None:
            return f"{name} {acc[name].get('headline_metric')}", v
    t = (report.get("fidelity") or {}).get("top1_agreement")
    return ("top-1 agreement with parent", t) if t is not None else (None, None)


def _points(reports: Sequence[dict]) -> tuple[list[tuple[str, float, float]], str | None]:
    pts, label = [], None
    for r in reports:
        lab, acc = headline(r)
        speed = (r.get("latency") or {}).get("decode_tok_s")
        if acc is None or speed is None:
            continue
        label = label or lab
        pts.append((r["artifact"]["name"], float(speed), float(acc)))
    return pts, label


def plots(report: dict, others: Sequence[dict], out_dir: Path) -> dict[str, Path]:
    """pareto.png (accuracy vs decode tok/s over this and the other reports, front marked) and
    ttft.png (TTFT distribution per report). Records the paths (or the reason) in report['plots']."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report["plots"] = {"plots_unavailable_reason": "matplotlib is not installed (pip install 'edgemed[bench]')"}
        return {}
    reports = [report, *others]
    written: dict[str, Path] = {}
    info: dict[str, Any] = {}

    pts, label = _points(reports)
    if pts:
        front = set(pareto_front(pts))
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
        for n, x, y in pts:
            ax.scatter([x], [y], s=40, color="tab:red" if n in front else "tab:gray", zorder=3)
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        fp = sorted((x, y) for n, x, y in pts if n in front)
        ax.plot([p[0] for p in fp], [p[1] for p in fp], "--", color="tab:red", lw=1, label="Pareto front")
        ax.set_xlabel("decode tok/s (p50 TPOT)")
        ax.set_ylabel(label or "accuracy")
        ax.set_title("accuracy vs decode speed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written["pareto"] = out_dir / "pareto.png"
        fig.savefig(written["pareto"])
        plt.close(fig)
        info["pareto_front"] = sorted(front)
    else:
        info["pareto_unavailable_reason"] = "no report has both an accuracy and a decode rate"

    samples = [(r["artifact"]["name"], (r.get("latency") or {}).get("ttft_ms_samples") or []) for r in reports]
    samples = [(n, s) for n, s in samples if s]
    if samples:
        fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(samples) + 2), dpi=110)
        ax.boxplot([s for _, s in samples], vert=False, showfliers=True)
        ax.set_yticks(range(1, len(samples) + 1), [n for n, _ in samples], fontsize=7)
        for i, (_, s) in enumerate(samples, 1):
            ax.scatter(s, [i] * len(s), s=8, alpha=0.5, color="tab:blue", zorder=3)
        ax.set_xlabel("TTFT ms (preprocessing + vision + prefill)")
        ax.set_title("time to first token")
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        written["ttft"] = out_dir / "ttft.png"
        fig.savefig(written["ttft"])
        plt.close(fig)
    else:
        info["ttft_unavailable_reason"] = "no TTFT samples"
    info.update({k: v.name for k, v in written.items()})
    report["plots"] = info
    return written


def markdown(r: dict) -> str:
    a, lat, mem, en, roof, fid = (r.get(k) or {} for k in ("artifact", "latency", "memory", "energy", "roofline",
                                                             "fidelity"))
    host = r.get("host") or {}
    lines = [f"# edgemed bench: {a.get('name')}", "",
             f"- artifact: `{a.get('path')}` ({a.get('format')}, recipe {a.get('recipe')}, status {a.get('status')})",
             f"- target: {(r.get('target') or {}).get('name', 'n/a')}; host: {host.get('cpu')}, "
             f"{host.get('cores')} cores, accelerator {host.get('accelerator') or 'none'}, {host.get('os')}",
             _device_line(r.get("device")),
             f"- created {r.get('created_utc')} by edgemed {r.get('edgemed_version')}; greedy decoding", "",
             "## Latency", "", "| metric | p50 | p90 | p99 |", "|---|---|---|---|"]
    for k in ("ttft_ms", "tpot_ms"):
        v = lat.get(k) or {}
        lines.append(f"| {k} | {_fmt(v.get('p50'))} | {_fmt(v.get('p90'))} | {_fmt(v.get('p99'))} |")
    lines += ["", f"decode {_fmt(lat.get('decode_tok_s'))} tok/s, prefill {_fmt(lat.get('prefill_tok_s'))} tok/s, "
              f"vision encode p50 {_fmt((lat.get('vision_encode_ms') or {}).get('p50'))} ms "
              f"({lat.get('runs')} runs after {lat.get('warmup')} warm-up, {lat.get('prompt_tokens')} prompt tokens, "
              f"{lat.get('output_tokens_per_run')} output tokens). TTFT includes preprocessing and the vision encoder.",
              "", "## Memory", "",
              f"peak RSS {_fmt(mem.get('peak_rss_mb'), 4)} MB; accelerator "
              f"{_fmt(mem.get('peak_accel_mb'), 4)} MB{' (' + mem['peak_accel_mb_unavailable_reason'] + ')' if mem.get('peak_accel_mb_unavailable_reason') else ''}; "
              f"artifact {_fmt(mem.get('artifact_mb'), 4)} MB (+ {_fmt(mem.get('reference_mb'), 3)} MB cached parent reference)",
              "", "## Energy", ""]
    if en.get("joules") is None:
        lines.append(f"not measured: {en.get('energy_unavailable_reason')}")
    else:
        lines.append(f"{_fmt(en.get('joules_per_request'))} J/request, {_fmt(en.get('joules_per_token'))} J/token, "
                     f"{_fmt(en.get('tokens_per_joule'))} tokens/J (method {en.get('method')}, power mode "
                     f"{en.get('power_mode')})")
    lines += ["", "## Roofline", "",
              f"bandwidth {_fmt(roof.get('bandwidth_gb_s'))} GB/s ({roof.get('bandwidth_source')}); "
              f"{_fmt(roof.get('bytes_per_token'), 4)} bytes/token at {_fmt(roof.get('context_tokens'))} context; "
              f"ceiling {_fmt(roof.get('decode_ceiling_tok_s'))} tok/s; measured fraction {_fmt(roof.get('fraction'))}"]
    lines += [f"- note: {n}" for n in roof.get("notes", [])]
    lines += ["", "## Fidelity against the parent", ""]
    if fid.get("fidelity_unavailable_reason"):
        lines.append(f"not measured: {fid['fidelity_unavailable_reason']}")
    else:
        lines.append(f"KLD mean {_fmt(fid.get('kld_mean'))}, p99 {_fmt(fid.get('kld_p99'))}, top-1 agreement "
                     f"{_fmt(fid.get('top1_agreement'))} over {fid.get('positions')} teacher-forced positions "
                     f"({fid.get('kld_note')}); answer flip rate {_fmt(fid.get('answer_flip_rate'))} "
                     f"(n={fid.get('answer_flip_n')}, 95% CI {fid.get('answer_flip_rate_ci95')}, "
                     f"directions {fid.get('answer_flip_directions')})")
        hp = fid.get("hallucination_probe") or {}
        if hp.get("n"):
            lines.append(f"\nhallucination probe (\"yes\" to a finding on a normal image, n={hp['n']}): parent "
                         f"{_fmt(hp.get('parent_yes_rate'))}, artifact {_fmt(hp.get('artifact_yes_rate'))}")
    lines += ["", "## Accuracy", "",
              "| suite | n | headline | value | 95% CI | closed strict | closed LLaVA-Med-compat | open recall |",
              "|---|---|---|---|---|---|---|---|"]
    for s, b in (r.get("accuracy") or {}).items():
        ci = b.get("ci95")
        ci_s = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "n/a"
        lines.append(f"| {s} | {b.get('n')} | {b.get('headline_metric')} | {_fmt(b.get('headline'))} | {ci_s} | "
                     f"{_fmt(b.get('closed_acc'))} | {_fmt(b.get('closed_acc_llava_med_compat'))} | "
                     f"{_fmt(b.get('open_recall'))} |")
    lines += ["", "The LLaVA-Med-compatible closed accuracy reproduces its scorer (drops wrong yes/no answers from "
              "the denominator, matches \"no\" inside \"normal\"); the strict number counts every item. Open recall "
              "is LLaVA-Med's, not MedGemma's tokenized F1."]
    for s, b in (r.get("accuracy") or {}).items():
        for key, t in (b.get("subgroups") or {}).items():
            lines += ["", f"### {s}: {t['metric']} by {key} (worst {t['worst']}, best-worst gap {_fmt(t['gap'])})", "",
                      "| group | n | value | 95% CI |", "|---|---|---|---|"]
            for g, row in t["groups"].items():
                lines.append(f"| {g} | {row['n']} | {_fmt(row['value'])} | {row['ci95']} |")
    pl = r.get("plots") or {}
    if pl.get("pareto"):
        lines += ["", f"![accuracy vs decode speed]({pl['pareto']})"]
    if pl.get("ttft"):
        lines += ["", f"![TTFT distribution]({pl['ttft']})"]
    if pl.get("plots_unavailable_reason"):
        lines += ["", f"plots skipped: {pl['plots_unavailable_reason']}"]
    return "\n".join(lines) + "\n"


def comparison_markdown(table: dict) -> str:
    rows = table["rows"]
    lines = [f"# edgemed comparison: parent `{table['parent']}`", "",
             f"host: {table['host'].get('cpu')}, {table['host'].get('cores')} cores; one process, same prompt and image, "
             f"{table['runs']} runs x {table['max_new_tokens']} tokens each, greedy.", "",
             "| model | format | decode tok/s | x parent | TTFT p50 ms | x parent | peak RSS MB | size MB | "
             "KLD mean | top-1 agree | flip rate | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['format']} | {_fmt(r['decode_tok_s'])} | {_fmt(r['decode_speedup_vs_parent'])} | "
                     f"{_fmt(r['ttft_ms_p50'])} | {_fmt(r['ttft_ratio_vs_parent'])} | {_fmt(r['peak_rss_mb'], 4)} | "
                     f"{_fmt(r['size_mb'], 4)} | {_fmt(r['kld_mean'])} | {_fmt(r['top1_agreement'])} | "
                     f"{_fmt(r['answer_flip_rate'])} | {_fmt(r['accuracy'])} |")
    lines += ["", "x parent: decode tok/s divided by the parent's (higher is faster); TTFT divided by the parent's "
              "(lower is faster). Peak RSS is the whole process (the parent stays loaded), so compare it across "
              "separate device_bench.py runs, not here."]
    return "\n".join(lines) + "\n"


def _device_line(device: dict | None) -> str:
    if not device:
        return "- ran on: not recorded"
    line = f"- ran on: {device.get('ran_on')} ({device.get('reason')})"
    gpu = device.get("gpu") or {}
    if device.get("ran_on") == "cuda" and gpu.get("name"):
        line += (f"; {gpu['name']}, driver {gpu.get('driver')}, CUDA {gpu.get('cuda_driver')}, SM clock "
                 f"{gpu.get('sm_clock_mhz')}/{gpu.get('sm_clock_max_mhz')} MHz, power limit {gpu.get('power_limit_w')} W")
    if device.get("power_mode"):
        line += f"; {device['power_mode']}"
    return line
