"""compress --low-memory's parity session for an ONNX artifact: memory and time of its three ways.

    python bench/bench_layered_parity.py ARTIFACT [--rounds 3] [--out bench/results/layered-parity]

ARTIFACT: an ONNX artifact folder written by `edgemed compress` (its parent_reference.npz is the
gate suite's reference). Each mode runs in a child process of its own, interleaved over the
rounds, and does what compress's parity step does after the export: open the session, the parity
prompts' logits at every position (prefill, and the KV-cache decode path from the middle), the
gate suite against the parent's cached reference (teacher-forced KLD and greedy answers):

  whole      one ONNX Runtime session over the whole decoder graph (compress without --low-memory)
  per-call   the decoder one layer at a time (formats/onnx/layered.py), a pass over the layers per
             forward call (every decode step, every generated token)
  batched    the same, with every request of a step in one pass over the layers and the gate
             suite's answers checked against the parent's as drafts (what compress --low-memory runs)

Recorded per mode: wall seconds (medians over the rounds), the child's peak RSS (getrusage), and a
sha256 of the logits and answers: the three must agree bit for bit (the script exits 1 otherwise).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("whole", "per-call", "batched")


def child(path: Path, mode: str) -> dict:
    import numpy as np

    from edgemed.artifact import read_manifest
    from edgemed.calibration.builtin import PARITY_PROMPTS
    from edgemed.formats.onnx.session import OnnxSession
    from edgemed.reference.cache import REFERENCE_FILE, compare_with_reference
    from edgemed.runtime.session import logits_many

    t0 = time.perf_counter()
    session = OnnxSession(path, read_manifest(path), layered=mode != "whole")
    if mode == "per-call":
        type(session).batches_passes = property(lambda self: False)
    requests = []
    for prompt in PARITY_PROMPTS:
        ids = session.prompt_ids(prompt, False)
        requests += [(ids, None, None), (ids, None, max(1, len(ids) // 2))]
    digest = hashlib.sha256()
    for logits in logits_many(session, requests):
        digest.update(np.ascontiguousarray(logits).tobytes())
    gate = compare_with_reference(session, path / REFERENCE_FILE)
    digest.update(json.dumps(gate, sort_keys=True, default=str).encode())
    return {"mode": mode, "seconds": time.perf_counter() - t0, "layered": type(session.decoder).__name__,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "sha256": digest.hexdigest(),
            "gate_kld_mean": gate["kld_mean"], "answer_flip_rate": gate.get("answer_flip_rate")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "layered-parity")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.artifact, args.child)))
        return 0
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, str(args.artifact), "--child", mode],
                                 check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {mode}: {runs[mode][-1]['seconds']:.1f} s, {runs[mode][-1]['peak_rss_gb']:.2f} GB",
                  flush=True)
    rows = [{"mode": m, "seconds_median": statistics.median(x["seconds"] for x in runs[m]),
             "peak_rss_gb_max": max(x["peak_rss_gb"] for x in runs[m]), **{k: runs[m][0][k] for k in
             ("layered", "sha256", "gate_kld_mean", "answer_flip_rate")}} for m in MODES]
    same = len({x["sha256"] for m in MODES for x in runs[m]}) == 1
    data = {"artifact": str(args.artifact), "rounds": args.rounds,
            "machine": platform.processor() or platform.machine(),
            "command": "python bench/bench_layered_parity.py " + " ".join(sys.argv[1:]), "identical": same,
            "modes": rows, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# Parity's session: whole graph or one layer at a time\n\n    {data['command']}\n",
             f"Artifact: `{args.artifact}`; {args.rounds} interleaved rounds; logits and answers identical in "
             f"every mode and round: {same}.\n",
             "| mode | seconds (median) | peak RSS (GB) | gate KLD mean | flip rate |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['seconds_median']:.1f} | {r['peak_rss_gb_max']:.2f} | {r['gate_kld_mean']:.4g} | "
              f"{r['answer_flip_rate']} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
