"""The int4/int8 grids' speed (edgemed.formats.onnx.int4.grids): edgemed's code against the plain code it replaced.

    python bench/bench_grids.py [--rounds 3] [--shapes 576x1536 2048x2048 2048x5632] [--grids int4 int8 gptq]
                                [--out bench/results/grids]

The grids are the slow step of every ONNX int4 / int8-mse compress. Each variant is timed against
the baseline in one run (interleaved rounds in a rotating order, medians), and the outputs compared.

mse (int4, int4-fast: each block's grid chosen among 41 scales x 7 zero-point shifts): two changes
made it faster without changing a byte (checked: same bytes):
  - threads: the column ranges are independent and run on a thread per core (grids._over_columns);
  - distinct candidates: at one scale the 7 shifted zero points round to 2 or 3 integers; the plain
    search (`plain_mse_quantize` below, edgemed's code up to 7087d78) scored every block at all 7,
    edgemed's scores a block again only where a shift gives it a zero point not scored yet.
int8 (mse_quantize_int8, int8-mse: 21 scales, no zero points) has only the thread change.

gptq (int4-gptq): the GPTQ paper's lazy batch updates (rows quantized 128 at a time, the error
pushed onto later rows by one matrix product per batch) against `plain_gptq_quantize` below (every
row's error pushed onto all later rows by an outer product, edgemed's code up to 7087d78). The same
algorithm in another summation order: compared by the share of equal codes and the largest
relative scale difference (bytes may differ by rounding). The Hessian is X^T X of random
inputs (512 rows, each channel mixed with its neighbour).

Shapes [K, N]: SmolLM2-135M's MLP (576 x 1536), TinyLlama-1.1B's attention (2048 x 2048) and MLP
(2048 x 5632) projections, and on request a down projection (5632x2048, gptq's largest K there) or
Mistral-7B's (14336x4096); random weights, importance from a random positive vector. Writes JSON +
Markdown.
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

SHAPES = ["576x1536", "2048x2048", "2048x5632"]


def plain_mse_quantize(w: np.ndarray, block: int, importance: np.ndarray | None = None, chunk: int = 1024):
    """grids.mse_quantize as it was up to 7087d78: every block scored at every (scale, shift) candidate."""
    w, k, n, nb, imp = grids._blocked(w, block, importance)
    q_out = np.zeros((k, n), np.uint8)
    s_out, z_out = np.zeros((nb, n), np.float32), np.zeros((nb, n), np.float32)

    def one(c0: int, c1: int) -> None:
        b = w[:, c0:c1].T.reshape(-1, nb, block)  # [n, nb, block]
        lo, hi = b.min(-1), b.max(-1)
        span = np.maximum(hi - lo, 1e-12) / 15
        best_e = best_s = best_z = None
        for f in grids.MSE_SCALE_FACTORS:
            s = span * f
            for shift in grids.MSE_ZERO_SHIFTS:
                z = np.clip(np.rint(-lo / s + shift), 0, 15)
                q = np.clip(np.rint(b / s[..., None] + z[..., None]), 0, 15)
                e = (imp * (s[..., None] * (q - z[..., None]) - b) ** 2).sum(-1)
                if best_e is None:
                    best_e, best_s, best_z = e, s, z
                else:
                    better = e < best_e
                    best_e = np.where(better, e, best_e)
                    best_s = np.where(better, s, best_s)
                    best_z = np.where(better, z, best_z)
        q = np.clip(np.rint(b / best_s[..., None] + best_z[..., None]), 0, 15)
        qz = q - best_z[..., None]
        num, den = (imp * b * qz).sum(-1), (imp * qz * qz).sum(-1)
        ok = (den > 0) & (num > 0)
        s = np.where(ok, num / np.where(ok, den, 1), best_s)
        q_out[:, c0:c1] = q.reshape(-1, k).T
        s_out[:, c0:c1], z_out[:, c0:c1] = s.T, best_z.T

    grids._over_columns(one, n, chunk)
    return q_out, s_out, z_out


def plain_gptq_quantize(w: np.ndarray, h: np.ndarray, block: int, damp: float = 0.01):
    """grids.gptq_quantize as it was up to 7087d78: each row's error onto all later rows at once."""
    w, hinv = grids.gptq_prepare(w, h, damp)  # the same preparation as before
    k, n = w.shape
    nb = k // block
    q = np.zeros((k, n), np.uint8)
    scales, zps = np.zeros((nb, n)), np.zeros((nb, n))
    for i in range(k):
        b = i // block
        if i % block == 0:
            scales[b], zps[b] = grids.min_max_grid(w[i:i + block])
        qi = np.clip(np.rint(w[i] / scales[b]) + zps[b], 0, 15)
        q[i] = qi
        err = (w[i] - (qi - zps[b]) * scales[b]) / hinv[i, i]
        if i + 1 < k:
            w[i + 1:] -= np.outer(hinv[i, i + 1:], err)
    return q, scales, zps


def serial(one, n: int, chunk: int) -> None:
    for c0 in range(0, n, chunk):
        one(c0, min(n, c0 + chunk))


def variants(grid: str):
    """(label, function, column runner); the first is the baseline."""
    threaded = grids._over_columns
    if grid == "int8":
        return [("one loop", grids.mse_quantize_int8, serial), ("threads", grids.mse_quantize_int8, threaded)]
    if grid == "gptq":
        return [("row by row", plain_gptq_quantize, threaded), ("lazy batches", grids.gptq_quantize, threaded)]
    return [("plain, one loop", plain_mse_quantize, serial), ("plain, threads", plain_mse_quantize, threaded),
            ("distinct, one loop", grids.mse_quantize, serial), ("distinct, threads", grids.mse_quantize, threaded)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="K x N, e.g. 4096x14336")
    ap.add_argument("--grids", nargs="+", default=["int4", "int8", "gptq"], choices=["int4", "int8", "gptq"])
    ap.add_argument("--out", type=Path, default=Path("bench/results/grids"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    threaded = grids._over_columns
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        imp = rng.random(k).astype(np.float32) + 0.1
        hessian = None
        if "gptq" in args.grids:  # correlated neighbouring channels, rank 512 (GPTQ's damping inverts it)
            x = rng.standard_normal((512, k))
            x[:, 1:] += 0.5 * x[:, :-1]
            hessian = x.T @ x
        for grid in args.grids:
            vs = variants(grid)
            times: dict[str, list[float]] = {label: [] for label, _, _ in vs}
            outs = {}
            try:
                for r in range(args.rounds):
                    for label, fn, over in vs[r % len(vs):] + vs[:r % len(vs)]:  # a rotating order
                        grids._over_columns = over
                        t = time.perf_counter()
                        outs[label] = fn(w, hessian, 32) if grid == "gptq" else fn(w, 32, imp)
                        times[label].append(time.perf_counter() - t)
            finally:
                grids._over_columns = threaded
            base = vs[0][0]
            same = all(all(np.array_equal(a, b) for a, b in zip(outs[base], o)) for o in outs.values())
            med = {label: float(np.median(v)) for label, v in times.items()}
            row = {"shape": [k, n], "grid": grid, "seconds": times, "median_s": med,
                   "speedup_vs_baseline": {label: med[base] / m for label, m in med.items()}, "same_bytes": same,
                   "codes_equal": {label: float((o[0] == outs[base][0]).mean()) for label, o in outs.items()},
                   "scales_max_rel_diff": {label: float(np.abs(o[1] - outs[base][1]).max() / np.abs(outs[base][1]).max())
                                           for label, o in outs.items()}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"command": "python bench/bench_grids.py " + " ".join(
                f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "numpy": np.__version__, "rounds": args.rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [f"# int4 / int8 grids: seconds per matrix ({meta['cores']} cores, {args.rounds} interleaved rounds, "
             "medians; x = speedup over the first variant of the row's grid)", "", f"`{meta['command']}`", "",
             "| K x N | grid | variant | seconds | x | same bytes | codes equal | scales: max rel. diff |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        for label, m in r["median_s"].items():
            lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['grid']} | {label} | {m:.2f} | "
                         f"{r['speedup_vs_baseline'][label]:.2f} | {r['same_bytes']} | {r['codes_equal'][label]:.6f} | "
                         f"{r['scales_max_rel_diff'][label]:.1e} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["same_bytes"] for r in rows if r["grid"] != "gptq") else 1


if __name__ == "__main__":
    raise SystemExit(main())
