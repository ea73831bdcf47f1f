"""A sweep's rows (one per recipe x target), its choice per target, sweep.json, sweep.md and a
Pareto plot per target, from the plans, the jobs' results and the bench reports on disk."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _accuracy(report: dict) -> dict[str, Any] | None:
    """The first real suite's headline with its 95% CI, else the built-in gate suite's."""
    acc = report.get("accuracy") or {}
    for name in [k for k in acc if k != "edgemed-gate"] + [k for k in acc if k == "edgemed-gate"]:
        block = acc[name]
        if block.get("headline") is not None:
            return {"suite": name, "metric": block.get("headline_metric"), "value": block["headline"],
                    "ci95": block.get("ci95"), "n": block.get("n")}
    return None


def build_rows(pairs: list[dict], jobs: dict[str, dict], results: dict[str, dict]) -> list[dict[str, Any]]:
    from edgemed.artifact import read_manifest

    shared: dict[str, list[str]] = {}
    for p in pairs:
        if p["artifact"]:
            shared.setdefault(p["artifact"], []).append(p["target"])
    rows = []
    for p in pairs:
        plan = p.get("plan") or {}
        row: dict[str, Any] = {
            "recipe": p["recipe"], "target": p["target"], "artifact": p["artifact"],
            "shared_with": [t for t in shared.get(p["artifact"], []) if t != p["target"]],
            "predicted_decode_tok_s": plan.get("decode_ceiling_tok_s"),
            "predicted_memory_mb": plan.get("runtime_memory_mb"),
            "predicted_artifact_mb": plan.get("artifact_mb"),
            "host_peak_ram_gb": (plan.get("host") or {}).get("peak_ram_gb"),
        }
        if not p["feasible"]:
            rows.append({**row, "status": "refused", "reasons": p["reasons"]})
            continue
        job, result = jobs[p["artifact"]], results.get(p["artifact"]) or {"status": "failed", "error": "no result"}
        row.update(path=job["artifact"], report=job["report"], seconds=result.get("seconds"),
                   compressed_now=result.get("compressed"), benched_now=result.get("benched"))
        if result.get("status") != "done":
            rows.append({**row, "status": "failed", "error": result.get("error"), "traceback": result.get("traceback")})
            continue
        manifest = read_manifest(job["artifact"])
        report = json.loads(Path(job["report"]).read_text())
        fid, lat = report.get("fidelity") or {}, report.get("latency") or {}
        row.update(
            status="ok" if manifest.status != "rejected" else "rejected",
            gate={"status": manifest.status, "reason": manifest.status_reason},
            size_mb=(report.get("memory") or {}).get("artifact_mb"),
            kld_mean=(manifest.parity or {}).get("kld_mean"), top1_agreement=(manifest.parity or {}).get("top1_agreement"),
            gate_suite_kld_mean=fid.get("kld_mean"), answer_flip_rate=fid.get("answer_flip_rate"),
            accuracy=_accuracy(report), host_decode_tok_s=lat.get("decode_tok_s"),
            host_ttft_ms_p50=(lat.get("ttft_ms") or {}).get("p50"), host=(report.get("host") or {}).get("cpu"),
        )
        rows.append(row)
    return rows


def choices(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per target: the smallest artifact whose every gate passed (status ok), or why there is none."""
    out: dict[str, dict[str, Any]] = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        ok = [r for r in rows if r["target"] == target and r["status"] == "ok" and r.get("size_mb") is not None]
        if ok:
            best = min(ok, key=lambda r: r["size_mb"])
            out[target] = {"recipe": best["recipe"], "artifact": best["artifact"], "size_mb": best["size_mb"],
                           "kld_mean": best.get("kld_mean")}
        else:
            out[target] = {"recipe": None, "reason": "no artifact passed every gate for this target"}
    return out


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    summary["choice"] = choices(summary["rows"])
    summary["plots"] = plots(summary, out)
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "sweep.json")
    (out / "sweep.md").write_text(markdown(summary))


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _num(v: Any, decimals: int = 1) -> str:
    return "" if v is None else f"{v:,.{decimals}f}"


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Sweep: {summary['model']}", "",
             f"Recipes {', '.join(summary['recipes'])} x targets {', '.join(summary['targets'])}; engine "
             f"{summary['engine']} ({summary['jobs']} at once); suites: {', '.join(summary['suites']) or 'the built-in gate suite'}.",
             "Measured on this host: size, fidelity, accuracy, decode speed. Per target, the planner's decode "
             "ceiling (the roofline) and run-time memory.", "",
             "| recipe | target | status | artifact (shared with) | MB | KLD mean | top-1 | accuracy (95% CI) | "
             "host tok/s | target tok/s (plan) | target MB (plan) | note |",
             "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in summary["rows"]:
        acc = r.get("accuracy")
        acc_s = ""
        if acc:
            ci = acc.get("ci95")
            acc_s = f"{acc['value']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "") + f" {acc['suite']}"
        note = "; ".join(r.get("reasons") or []) or r.get("error") or ((r.get("gate") or {}).get("reason") or "")
        art = r.get("artifact") or ""
        if r.get("shared_with"):
            art += f" ({', '.join(r['shared_with'])})"
        lines.append(f"| {r['recipe']} | {r['target']} | {r['status']} | {art} | {_num(r.get('size_mb'), 2)} | "
                     f"{_fmt(r.get('kld_mean'))} | {_fmt(r.get('top1_agreement'))} | {acc_s} | "
                     f"{_num(r.get('host_decode_tok_s'))} | {_num(r.get('predicted_decode_tok_s'))} | "
                     f"{_num(r.get('predicted_memory_mb'))} | {note[:160].replace('|', '/')} |")
    lines += ["", "Per target, the smallest artifact that passes every gate:", ""]
    for target, c in summary["choice"].items():
        lines.append(f"- {target}: " + (f"`{c['recipe']}` ({c['size_mb']:.1f} MB, artifact {c['artifact']})"
                                         if c.get("recipe") else c["reason"]))
    for target, name in (summary.get("plots") or {}).items():
        if target != "plots_unavailable_reason":
            lines.append(f"\n![{target}]({name})")
    return "\n".join(lines) + "\n"


def plots(summary: dict[str, Any], out: Path) -> dict[str, str]:
    """sweep-<target>.png: fidelity (KLD, or accuracy where a suite ran) against size and against the
    planner's decode ceiling on that target, every measured artifact a point, the choice marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"plots_unavailable_reason": "matplotlib is not installed (pip install 'edgemed[bench]')"}
    written: dict[str, str] = {}
    choice = summary.get("choice") or {}
    for target in summary["targets"]:
        rows = [r for r in summary["rows"] if r["target"] == target and r.get("size_mb") is not None]
        if not rows:
            continue
        use_acc = all(r.get("accuracy") for r in rows) and any(r["accuracy"]["suite"] != "edgemed-gate" for r in rows)
        ys = [r["accuracy"]["value"] if use_acc else max(r.get("kld_mean") or 0.0, 1e-9) for r in rows]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
        for ax, key, label in ((axes[0], "size_mb", "artifact MB"),
                               (axes[1], "predicted_decode_tok_s", f"predicted decode tok/s on {target}")):
            for r, y in zip(rows, ys):
                if y is None or r.get(key) is None:
                    continue
                chosen = (choice.get(target) or {}).get("recipe") == r["recipe"]
                color = "tab:green" if chosen else ("tab:gray" if r["status"] == "rejected" else "tab:blue")
                ax.scatter([r[key]], [y], color=color, s=50 if chosen else 30, zorder=3)
                ax.annotate(r["recipe"] + (" (rejected)" if r["status"] == "rejected" else ""), (r[key], y),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel(rows[0]["accuracy"]["suite"] + " " + str(rows[0]["accuracy"]["metric"]) if use_acc
                          else "KLD mean vs parent (lower is better)")
            if not use_acc:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{target}: green = smallest artifact passing every gate")
        fig.tight_layout()
        name = f"sweep-{target}.png"
        fig.savefig(out / name)
        plt.close(fig)
        written[target] = name
    return written
