"""Logit agreement between two runs of the same prompt: numpy only (no torch), so the runtime's
own checks on a device (bench, bench/device_check.py) use the same numbers as parity."""
from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(parent: np.ndarray, child: np.ndarray) -> dict[str, float]:
    """KLD(parent || child) per position, top-1 agreement and max |diff| over all positions."""
    lp, lc = log_softmax(parent), log_softmax(child)
    kld = (np.exp(lp) * (lp - lc)).sum(-1)
    return {
        "positions": int(parent.shape[0]),
        "logits_max_abs_diff": float(np.abs(parent - child).max()),
        "kld_mean": float(kld.mean()),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "top1_agreement": float((parent.argmax(-1) == child.argmax(-1)).mean()),
    }


__all__ = ["compare_logits", "log_softmax"]
