"""mse_quantize / mse_quantize_int8 on a thread per core against the same code on one loop.

    python bench/bench_mse_threads.py [--rounds 3] [--out bench/results/mse-threads]

The mse grids (edgemed.formats.onnx.int4.grids) are the slow step of every ONNX int4 compress
(287 candidate grids per block). Their column ranges are independent, so they run on a thread per
core (grids._over_columns); this script times that against one loop over the same ranges
(interleaved rounds, medians), checks the outputs are the same bytes, and writes JSON + Markdown.
Shapes [K, N]: SmolLM2-135M's MLP (576 x 1536), TinyLlama-1.1B's attention (2048 x 2048) and MLP
(2048 x 5632) projections; random weights, importance from a random positive vector.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from edgemed.formats.onnx.int4 import grids

SHAPES = [(576, 1536), (2048, 2048), (2048, 5632)]


def serial(one, n: int, chunk: int) -> None:
    for c0 in range(0, n, chunk):
        one(c0, min(n, c0 + chunk))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/mse-threads"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    threaded = grids._over_columns
    rows = []
    for k, n in SHAPES:
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        imp = rng.random(k).astype(np.float32) + 0.1
        for name, fn in (("int4", grids.mse_quantize), ("int8", grids.mse_quantize_int8)):
            times = {"one loop": [], "threads": []}
            outs = {}
            for _ in range(args.rounds):
                for label, over in (("one loop", serial), ("threads", threaded)):
                    grids._over_columns = over
                    t = time.perf_counter()
                    outs[label] = fn(w, 32, imp)
                    times[label].append(time.perf_counter() - t)
            grids._over_columns = threaded
            same = all(np.array_equal(a, b) for a, b in zip(outs["one loop"], outs["threads"]))
            med = {label: float(np.median(v)) for label, v in times.items()}
            row = {"shape": [k, n], "grid": name, "seconds": times, "median_s": med,
                   "speedup": med["one loop"] / med["threads"], "same_bytes": same}
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"command": "python bench/bench_mse_threads.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "numpy": np.__version__, "rounds": args.rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [f"# mse grids: a thread per core vs one loop ({meta['cores']} cores, {args.rounds} interleaved rounds, medians)",
             "", f"`{meta['command']}`", "", "| K x N | grid | one loop (s) | threads (s) | speedup | same bytes |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape'][0]} x {r['shape'][1]} | {r['grid']} | {r['median_s']['one loop']:.2f} | "
              f"{r['median_s']['threads']:.2f} | {r['speedup']:.2f} | {r['same_bytes']} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["same_bytes"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
