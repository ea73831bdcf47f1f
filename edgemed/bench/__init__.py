"""Benchmarking: latency, energy and accuracy measurements that feed report.json.

`run_bench` (edgemed.bench.runner) is the entry point; importing this package stays torch-free.
"""
from __future__ import annotations


def run_bench(*args, **kwargs):
    """See edgemed.bench.runner.run_bench (imported lazily so `import edgemed.bench` stays light)."""
    from edgemed.bench.runner import run_bench as _run

    return _run(*args, **kwargs)


__all__ = ["run_bench"]
