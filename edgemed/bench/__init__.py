"""Benchmarking: latency, energy and accuracy measurements that feed report.json."""
