"""int4 grids for MatMulNBits that ONNX Runtime's quantizers do not write: GPTQ (its GPTQ path
ignores `nodes_to_exclude`, so the component policy could not be honoured: lm_head would go to
4 bits) and a least-squares block grid (`mse_quantize`; its rtn takes each block's min/max).

GPTQ (Frantar et al., 2022) quantizes a weight matrix one input row at a time and pushes each
row's rounding error onto the rows not yet quantized, weighted by the inverse Hessian
H = sum x x^T of that layer's inputs on calibration data. The grid is ONNX Runtime's asymmetric
MatMulNBits grid (blocks along K, fp32 scale, 4-bit integer zero point), so the result runs on
the same fast kernel as `rtn`. Measured on SmolLM2-135M over 2,048 teacher-forced positions: KLD
0.210 (rtn) -> 0.152 (gptq, 32 of edgemed's built-in calibration turns) at the same speed; with
16 near-identical templated synthetic-cxr questions as calibration it gave no gain (0.222), so
the calibration set's variety matters more than its size.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def calibration_inputs(model, input_names: list[str], feeds: list[dict]):
    """For each calibration feed, {name: the tensor as [tokens, features] float64} for every tensor
    in input_names, from one run of the fp32 graph with those tensors added as outputs."""
    from edgemed.formats.onnx.graph import probe_session

    sess = probe_session(model, input_names)
    names = {i.name for i in sess.get_inputs()}
    outs = [o.name for o in sess.get_outputs()]
    for feed in feeds:
        values = dict(zip(outs, sess.run(None, {k: v for k, v in feed.items() if k in names})))
        yield {n: values[n].reshape(-1, values[n].shape[-1]).astype(np.float64) for n in input_names}


def hessians(model, input_names: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """H = X^T X for every tensor in input_names, over the calibration feeds (fp32 graph)."""
    acc: dict[str, np.ndarray] = {}
    for xs in calibration_inputs(model, input_names, feeds):
        for name, x in xs.items():
            acc[name] = acc.get(name, 0) + x.T @ x
    return acc


def mean_squares(model, input_names: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """E[x_k^2] per input channel k of every tensor in input_names (llama.cpp's imatrix, the
    diagonal of H / tokens), over the calibration feeds."""
    acc: dict[str, np.ndarray] = {}
    count = 0
    for xs in calibration_inputs(model, input_names, feeds):
        count += next(iter(xs.values())).shape[0] if xs else 0
        for name, x in xs.items():
            acc[name] = acc.get(name, 0) + (x * x).sum(0)
    return {name: a / max(count, 1) for name, a in acc.items()}


class ProbeStats:
    """Calibration statistics from passes of the feeds through the fp32 graph itself (an ONNX
    Runtime probe session with the MatMul inputs as extra outputs): any graph, any exporter."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds

    def mean_squares(self, model, input_names: list[str]) -> dict[str, np.ndarray]:
        return mean_squares(model, input_names, self.feeds)

    def hessians(self, model, input_names: list[str]) -> dict[str, np.ndarray]:
        return hessians(model, input_names, self.feeds)


def min_max_grid(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per column of the asymmetric 4-bit grid spanning rows' min..max (rtn's)."""
    lo, hi = rows.min(0), rows.max(0)
    d = (hi - lo) / 15
    d[d == 0] = 1e-12
    return d, np.clip(np.rint(-lo / d), 0, 15)


def gptq_prepare(w: np.ndarray, h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(w [K, N] as float64 with dead input channels zeroed, the upper Cholesky factor of H^-1 with H
    damped by `damp` x its mean diagonal): what GPTQ's row updates read."""
    w = w.astype(np.float64).copy()
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    return w, np.linalg.cholesky(np.linalg.inv(h)).T


def gptq_quantize(w: np.ndarray, h: np.ndarray, block: int, damp: float = 0.01, lazy: int = 128):
    """w [K, N] -> (q [K, N] uint8 in 0..15, scales [K/block, N], zero points [K/block, N]).

    With the GPTQ paper's lazy batch updates: rows are quantized `lazy` at a time (rounded to whole
    blocks), each row's error pushed at once onto the rows of its batch only, and onto every later
    row by one matrix product per batch. The same algorithm as pushing each row's error onto all
    later rows at once (the error reaching a row is the same sum, in another order: equal to
    rounding), but BLAS does the work: TinyLlama's down projection (5632 x 2048) in 11 s instead of 71,
    most of it now H's inverse (bench/bench_grids.py)."""
    w, hinv = gptq_prepare(w, h, damp)
    k, n = w.shape
    nb = k // block
    q = np.zeros((k, n), np.uint8)
    scales, zps = np.zeros((nb, n)), np.zeros((nb, n))
    step = max(block, lazy // block * block)
    for b0 in range(0, k, step):
        b1 = min(k, b0 + step)
        wb, errs = w[b0:b1], np.zeros((b1 - b0, n))  # wb is a view: updated in place
        for i in range(b1 - b0):
            row, b = b0 + i, (b0 + i) // block
            if row % block == 0:  # the block's grid from the (error-updated) weights it now holds
                scales[b], zps[b] = min_max_grid(wb[i:i + block])
            qi = np.clip(np.rint(wb[i] / scales[b]) + zps[b], 0, 15)
            q[row] = qi
            errs[i] = (wb[i] - (qi - zps[b]) * scales[b]) / hinv[row, row]
            if i + 1 < b1 - b0:
                wb[i + 1:] -= np.outer(hinv[row, row + 1:b1], errs[i])
        if b1 < k:
            w[b1:] -= hinv[b0:b1, b1:].T @ errs
    return q, scales, zps


# The candidate grids mse_quantize tries per block: the min/max scale shrunk or stretched, and the
# zero point moved off its rounded position by a fraction of a step before rounding.
MSE_SCALE_FACTORS = np.linspace(0.8, 1.2, 41)
MSE_ZERO_SHIFTS = (0.0, -0.25, 0.25, -0.5, 0.5, -0.75, 0.75)


def _blocked(w: np.ndarray, block: int, importance: np.ndarray | None):
    """(w as fp32, K, N, blocks along K, per-block importance [K/block, block], ones where None)."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    nb = k // block
    imp = np.ones((nb, block), np.float32) if importance is None else \
        np.asarray(importance, np.float32).reshape(nb, block)
    return w, k, n, nb, imp


# Columns a search works on at a time: 64 keeps each fp32 temporary of a 4096-row matrix at 1 MiB,
# inside a core's L2, where 1024 columns streamed every elementwise pass through memory. Measured on
# this 2-core EPYC (4096 x 2048, block 32, importance-weighted; the same bytes at every width):
# int4 search 8.1 / 7.7 s at 1024 columns, 6.8 / 6.1 at 256, 5.1 / 4.7 at 64, 5.2 / 5.5 at 32;
# int8 1.09 s at 1024, 0.73 at 64.
COLUMNS = 64


def _over_columns(one, n: int, chunk: int) -> None:
    """one(c0, c1) for column ranges of at most `chunk` columns covering 0..n, on a thread per core:
    the columns are independent and numpy's ufuncs let go of the GIL, so the result is the same
    bytes as one loop over them, sooner (measured: bench/bench_grids.py). Each range holds a few
    fp32 temporaries of its columns, so at most 4 x `chunk` columns are in flight (compress
    --low-memory's plan counts the streamed phases in multiples of the largest tensor)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    step = max(1, min(chunk, -(-n // cores)))
    ranges = [(c0, min(n, c0 + step)) for c0 in range(0, n, step)]
    workers = min(cores, len(ranges), max(1, 4 * chunk // step))
    if workers == 1:
        for r in ranges:
            one(*r)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(lambda r: one(*r), ranges):  # re-raises a range's exception
            pass


def mse_quantize(w: np.ndarray, block: int, importance: np.ndarray | None = None, chunk: int = COLUMNS):
    """w [K, N] -> (q [K, N] uint8 in 0..15, scales [K/block, N], zero points [K/block, N]) on the
    asymmetric MatMulNBits grid, each block's grid chosen to minimise the squared error of its
    weights rather than to span their min..max (rtn).

    Per block: every (scale factor, zero-point shift) candidate is rounded and scored, the best
    kept, then its scale refitted by least squares to the integers it chose. `importance` [K]
    (e.g. the mean square of each input channel on calibration data) weights the errors; None
    weights them equally. Measured on SmolLM2-135M (every projection int4, block 32, lm_head
    int8, 2,048 teacher-forced positions): KLD 0.21 (ONNX Runtime's rtn) -> 0.10 (this,
    importance-weighted) at the same speed: the same kernel reads the same bytes.

    The search is exhaustive over the 41 x 7 candidates, but a block is scored once per distinct
    candidate: at one scale the 7 shifted zero points round to 2 or 3 integers, and a repeat scores
    the error already scored (never strictly better), so only the blocks a shift gives a new zero
    point are scored again: about 2.5 rounding passes per scale instead of 7, the same bytes as
    scoring all of them (bench/bench_grids.py checks it against the plain search).
    """
    w, k, n, nb, imp = _blocked(w, block, importance)
    q_out = np.zeros((k, n), np.uint8)
    s_out, z_out = np.zeros((nb, n), np.float32), np.zeros((nb, n), np.float32)

    def one(c0: int, c1: int) -> None:
        cols = c1 - c0
        b = w[:, c0:c1].T.reshape(-1, block)  # [cols * nb, block]: one row a block
        ib = np.ascontiguousarray(np.broadcast_to(imp, (cols, nb, block)).reshape(-1, block))
        lo, hi = b.min(-1), b.max(-1)
        span = np.maximum(hi - lo, 1e-12) / 15
        best_e = best_s = best_z = None
        for f in MSE_SCALE_FACTORS:
            s = span * f
            x, zc = b / s[:, None], -lo / s
            seen: list[np.ndarray] = []
            for shift in MSE_ZERO_SHIFTS:
                z = np.clip(np.rint(zc + shift), 0, 15)
                if best_e is None:  # the first candidate: every block's first best
                    q = np.clip(np.rint(x + z[:, None]), 0, 15)
                    best_e, best_s, best_z = (ib * (s[:, None] * (q - z[:, None]) - b) ** 2).sum(-1), s, z
                    seen.append(z)
                    continue
                # Only the blocks this shift gives a zero point not scored yet at this scale: a repeat
                # scores the same error, never strictly better, so skipping it changes nothing.
                new = np.ones(z.shape, bool)
                for earlier in seen:
                    new &= z != earlier
                seen.append(z)
                idx = np.flatnonzero(new)
                if not idx.size:
                    continue
                zi, si = z[idx], s[idx]
                q = np.clip(np.rint(x[idx] + zi[:, None]), 0, 15)
                e = (ib[idx] * (si[:, None] * (q - zi[:, None]) - b[idx]) ** 2).sum(-1)
                better = e < best_e[idx]
                j = idx[better]
                best_e[j], best_s[j], best_z[j] = e[better], si[better], zi[better]
        q = np.clip(np.rint(b / best_s[:, None] + best_z[:, None]), 0, 15)
        qz = q - best_z[:, None]
        num, den = (ib * b * qz).sum(-1), (ib * qz * qz).sum(-1)
        ok = (den > 0) & (num > 0)
        s = np.where(ok, num / np.where(ok, den, 1), best_s)  # least-squares scale for these integers
        q_out[:, c0:c1] = q.reshape(cols, k).T
        s_out[:, c0:c1], z_out[:, c0:c1] = s.reshape(cols, nb).T, best_z.reshape(cols, nb).T

    _over_columns(one, n, chunk)
    return q_out, s_out, z_out


# Scale candidates for int8 blocks, as fractions of absmax / 127 (rtn's scale is 1.0).
MSE8_SCALE_FACTORS = np.linspace(0.80, 1.0, 21)


def mse_quantize_int8(w: np.ndarray, block: int, importance: np.ndarray | None = None, chunk: int = COLUMNS):
    """w [K, N] -> (q [K, N] uint8 = code + 128, scales [K/block, N]): symmetric int8 blocks for
    MatMulNBits bits 8 (no zero points: its default is 128), each block's scale chosen among
    MSE8_SCALE_FACTORS x absmax/127 for the least squared error (clipping the largest weight a
    little often rounds the rest better), weighted by `importance` [K] where given, then refitted by
    least squares to the codes it chose. llama.cpp's Q8_0 takes absmax/127."""
    w, k, n, nb, imp = _blocked(w, block, importance)
    q_out = np.zeros((k, n), np.uint8)
    s_out = np.zeros((nb, n), np.float32)

    def one(c0: int, c1: int) -> None:
        b = w[:, c0:c1].T.reshape(-1, nb, block)  # [n, nb, block]
        base = np.maximum(np.abs(b).max(-1), 1e-12) / 127
        best_e = best_s = None
        for f in MSE8_SCALE_FACTORS:
            s = base * f
            q = np.clip(np.rint(b / s[..., None]), -128, 127)
            e = (imp * (s[..., None] * q - b) ** 2).sum(-1)
            if best_e is None:
                best_e, best_s = e, s
            else:
                better = e < best_e
                best_e, best_s = np.where(better, e, best_e), np.where(better, s, best_s)
        q = np.clip(np.rint(b / best_s[..., None]), -128, 127)
        num, den = (imp * b * q).sum(-1), (imp * q * q).sum(-1)
        ok = (den > 0) & (num > 0)
        s = np.where(ok, num / np.where(ok, den, 1), best_s)
        q_out[:, c0:c1] = (q + 128).astype(np.uint8).reshape(-1, k).T
        s_out[:, c0:c1] = s.T

    _over_columns(one, n, chunk)
    return q_out, s_out


def matmulnbits_initializers(name: str, q: np.ndarray, scales: np.ndarray, zps: np.ndarray, block: int):
    """MatMulNBits' packed layout: B [N, K/block, block/2] (two 4-bit values a byte, low nibble
    first), scales [N * K/block], zero points [N * ceil((K/block)/2)] packed the same way."""
    from onnx import numpy_helper

    k, n = q.shape
    nb = k // block
    qt = q.T.reshape(n, nb, block)
    packed = (qt[..., 0::2] | (qt[..., 1::2] << 4)).astype(np.uint8)
    zt = zps.T.astype(np.uint8)
    if nb % 2:
        zt = np.concatenate([zt, np.zeros((n, 1), np.uint8)], 1)
    zp = (zt[:, 0::2] | (zt[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return [numpy_helper.from_array(packed, f"{name}.q4"),
            numpy_helper.from_array(scales.T.astype(np.float32).reshape(-1), f"{name}.scales"),
            numpy_helper.from_array(zp, f"{name}.zero_points")]
