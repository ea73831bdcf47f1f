#!/usr/bin/env python3
"""The PyTorch parent and several artifacts, side by side in one process: one comparison table.

    python bench/compare.py PARENT_MODEL ARTIFACT [ARTIFACT ...] [--suite NAME=PATH] [--out DIR]

Every model gets the same latency request (image + prompt, greedy, a fixed number of tokens),
the same suites and the same meters, one after another in this process, so decode tok/s and
TTFT are directly comparable (ratios against the parent). Artifacts also get fidelity against
their cached parent reference, and, with suites, answer flips against the parent's answers
from this very run. Writes DIR/comparison.json, comparison.md, pareto.png, ttft.png and one
report.json per model under DIR/<name>/.

Needs torch + transformers for the parent (the full install); the artifacts need only the runtime.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parent_manifest(cm):
    """What the bench needs to know about the parent: fp32 weights per component (the roofline
    reads language + lm_head per token; in memory, not files: no sha256), the text facts for the KV size."""
    from edgemed.artifact import FileRecord, Manifest, ModelRecord, SourceRecord

    params = cm.component_params()
    files = [FileRecord(path=f"<{k} parameters, fp32>", sha256="", bytes=int(n) * 4, component=k)
             for k, n in params.items()]
    return Manifest(format="pytorch", name="parent", files=files, target=None, status="parent",
                    recipe={"name": "parent (fp32, PyTorch)"},
                    model=ModelRecord(family=cm.family, text=cm.text.to_dict(),
                                      image=cm.image.to_dict() if cm.image else None),
                    source=SourceRecord(model=cm.source))


def _ratio(a, b):
    return a / b if (a is not None and b) else None


def compare(parent: str, artifacts: list[Path], *, suites=(), out: Path, runs: int = 10, warmup: int = 2,
            max_new_tokens: int = 32, limit: int | None = None, split: str | None = None,
            progress=None) -> dict:
    from edgemed.reference.cache import flip_summary, hallucination_probe
    from edgemed.bench.meters import host_info
    from edgemed.reference.parent import ParentSession
    from edgemed.bench.report import comparison_markdown, headline, plots
    from edgemed.bench.runner import run_bench, write_report
    from edgemed.models import load_model

    say = progress or (lambda m: None)
    cm = load_model(parent)
    kw = dict(runs=runs, warmup=warmup, max_new_tokens=max_new_tokens, limit=limit, split=split, progress=say)
    say(f"parent {parent}")
    reports = [run_bench(None, suites, session=ParentSession(cm), manifest=parent_manifest(cm), name="parent",
                         **kw)]
    for a in artifacts:
        say(f"artifact {a}")
        reports.append(run_bench(a, suites, record_in_manifest=False, **kw))
    base = reports[0]
    rows = []
    for r in reports:
        is_parent = r is base
        suite_flips = {}
        if not is_parent:
            for s, preds in r["predictions"].items():
                ppreds = {p["id"]: p for p in base["predictions"].get(s, [])}
                pairs = [(p["id"], ppreds[p["id"]]["pred"], p["pred"], p.get("answer_type") == "closed")
                         for p in preds if p["id"] in ppreds]
                suite_flips[s] = flip_summary(pairs)
                probe = [{"normal": p.get("normal"), "finding": p.get("finding"), "artifact": p["pred"],
                          "parent": ppreds[p["id"]]["pred"]} for p in preds if p["id"] in ppreds]
                if any(x["normal"] and x["finding"] for x in probe):
                    suite_flips[s]["hallucination_probe"] = hallucination_probe(probe)
            r["fidelity"]["suites_vs_parent"] = suite_flips
        fid = r["fidelity"]
        flip = next((v["answer_flip_rate"] for v in suite_flips.values() if v.get("answer_flip_rate") is not None),
                    fid.get("answer_flip_rate"))
        lat = r["latency"]
        rows.append({
            "name": r["artifact"]["name"], "format": r["artifact"]["format"], "recipe": r["artifact"]["recipe"],
            "decode_tok_s": lat["decode_tok_s"], "decode_speedup_vs_parent": _ratio(lat["decode_tok_s"],
                                                                                   base["latency"]["decode_tok_s"]),
            "ttft_ms_p50": lat["ttft_ms"]["p50"], "ttft_ratio_vs_parent": _ratio(lat["ttft_ms"]["p50"],
                                                                                base["latency"]["ttft_ms"]["p50"]),
            "tpot_ms_p50": lat["tpot_ms"]["p50"], "peak_rss_mb": r["memory"]["peak_rss_mb"],
            "size_mb": r["memory"]["artifact_mb"], "kld_mean": fid.get("kld_mean"),
            "top1_agreement": fid.get("top1_agreement"), "answer_flip_rate": None if is_parent else flip,
            "accuracy_metric": headline(r)[0], "accuracy": headline(r)[1],
        })
    out.mkdir(parents=True, exist_ok=True)
    for r in reports:
        write_report(r, out / r["artifact"]["name"] / "report.json", plots=False)
    table = {"parent": parent, "host": host_info(), "runs": runs, "max_new_tokens": max_new_tokens,
             "suites": list(suites), "rows": rows}
    written = plots(reports[0], reports[1:], out)  # every model on one Pareto plot and one TTFT plot
    table["plots"] = {k: v.name for k, v in written.items()} or reports[0].get("plots")
    (out / "comparison.json").write_text(json.dumps(table, indent=2, default=str))
    (out / "comparison.md").write_text(comparison_markdown(table))
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent", help="the parent model: hub id or folder (what compress was given)")
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--suite", action="append", default=[], help="NAME or NAME=PATH; repeatable")
    ap.add_argument("--out", type=Path, default=Path("compare-out"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--split", default=None)
    args = ap.parse_args(argv)
    from edgemed.errors import EdgemedError

    try:
        table = compare(args.parent, args.artifacts, suites=args.suite, out=args.out, runs=args.runs,
                        warmup=args.warmup, max_new_tokens=args.max_new_tokens, limit=args.limit, split=args.split,
                        progress=lambda m: print(m, file=sys.stderr))
    except EdgemedError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print((args.out / "comparison.md").read_text())
    print(json.dumps({"rows": [{k: r[k] for k in ("name", "decode_tok_s", "decode_speedup_vs_parent")}
                               for r in table["rows"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
