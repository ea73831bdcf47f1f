"""One sweep job (compress one distinct artifact, then bench it on this host) and the engines that
run jobs: a local or remote Ray cluster, or a local process pool where Ray is not installed.

A job is a plain dict in and a plain dict out, so it crosses process and node boundaries as it is.
Every engine schedules by the job's host memory (plan.host_estimate's peak for its compress):
Ray through the task's `memory` resource, the process pool by starting a job only while the
running ones and it fit the budget. A job that fails returns its error; it never stops the others.
"""
from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

ENGINES = ("ray", "process")


def artifact_ready(folder: Path) -> bool:
    """A complete artifact: its manifest reads and every file matches it (sha256 included)."""
    from edgemed.artifact import read_manifest
    from edgemed.errors import EdgemedError
    from edgemed.runtime import check_artifact

    if not (folder / "manifest.json").is_file():
        return False
    try:
        check_artifact(folder, read_manifest(folder), hashes=True, allow_rejected=True)
    except EdgemedError:
        return False
    return True


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compress job["recipes"] for job["target"] into job["artifact"] unless a verified artifact is
    there, then bench it into job["report"] unless that exists. Returns what happened; never raises."""
    import json
    import logging

    from edgemed.errors import GateFailedError

    # A worker is a fresh interpreter: keep the exporters' INFO chatter (onnxscript's passes) out
    # of the sweep's output, as the CLI's own process does.
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    folder, report_path = Path(job["artifact"]), Path(job["report"])
    out: dict[str, Any] = {"key": job["key"], "compressed": False, "benched": False, "pid": os.getpid()}
    try:
        if not artifact_ready(folder):
            from edgemed.pipeline import compress

            try:
                compress(job["model"], job["recipes"], job["target"], folder, overwrite=folder.exists(),
                         host_memory_gb=job.get("host_memory_gb"))
            except GateFailedError:
                pass  # written, marked rejected: benched all the same, the verdict is in the row
            out["compressed"] = True
        if not report_path.is_file():
            from edgemed.bench import run_bench

            report_path.parent.mkdir(parents=True, exist_ok=True)
            report = run_bench(folder, job.get("suites") or [], runs=job.get("runs", 5), warmup=1,
                               max_new_tokens=job.get("max_new_tokens", 16), limit=job.get("limit"),
                               allow_rejected=True, plots=False, record_in_manifest=False)
            tmp = report_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(report, default=str))
            os.replace(tmp, report_path)
            out["benched"] = True
        out["status"] = "done"
    except Exception as e:  # recorded in the row; the other jobs go on
        out.update(status="failed", error=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc(limit=8)[-4000:])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def run_jobs(jobs: list[dict[str, Any]], engine: str, workers: int, memory_budget: int,
             ray_address: str | None = None, on_event: Callable[[str, dict], None] | None = None) -> list[dict]:
    """Run every job on `engine` ("ray" or "process") with at most `workers` at once and the sum of
    their `host_bytes` within `memory_budget` (a local budget; a Ray cluster has its own per node).
    on_event("start" | "end", job-or-result) drives progress bars."""
    emit = on_event or (lambda kind, payload: None)
    if engine == "ray":
        return list(_ray(jobs, workers, ray_address, emit))
    if engine == "process":
        return list(_pool(jobs, workers, memory_budget, emit))
    raise ValueError(f"engine {engine!r}: use one of {', '.join(ENGINES)}")


def _pool(jobs: list[dict], workers: int, budget: int, emit) -> Iterator[dict]:
    import multiprocessing

    pending = sorted(jobs, key=lambda j: -j["host_bytes"])  # big ones first, small ones fill the gaps
    running: dict[Any, dict] = {}
    # spawn: a fresh interpreter per worker (no forked torch/ONNX Runtime thread pools); one job per
    # worker process, so the RAM a compress held goes back to the host before the next job starts.
    with ProcessPoolExecutor(max_workers=max(workers, 1), mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        while pending or running:
            used = sum(j["host_bytes"] for j in running.values())
            for job in list(pending):
                if len(running) >= workers:
                    break
                if running and used + job["host_bytes"] > budget:
                    continue  # wait for memory; alone, a job runs (the plan already checked it fits)
                pending.remove(job)
                running[pool.submit(run_job, job)] = job
                used += job["host_bytes"]
                emit("start", job)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # the worker process itself died (killed for memory, ...)
                    result = {"key": job["key"], "status": "failed", "error": f"worker died: {type(e).__name__}: {e}"}
                emit("end", result)
                yield result


def _ray(jobs: list[dict], workers: int, address: str | None, emit) -> Iterator[dict]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry: nothing leaves the machine
    import ray

    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False)
    try:
        node_memory = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        remote = ray.remote(max_calls=1)(run_job)  # a fresh worker process per job: its RAM goes back after
        refs: dict[Any, dict] = {}
        for job in jobs:
            if job["host_bytes"] > node_memory:
                result = {"key": job["key"], "status": "failed",
                          "error": f"needs about {job['host_bytes'] / 1e9:.1f} GB of RAM; the largest Ray node "
                                   f"offers {node_memory / 1e9:.1f} GB"}
                emit("end", result)
                yield result
                continue
            # One CPU each: compress and ONNX Runtime use the threads they find, Ray only counts jobs.
            ref = remote.options(num_cpus=1, memory=int(job["host_bytes"]), max_retries=0).remote(job)
            refs[ref] = job
            emit("start", job)
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                job = refs.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # the worker died (ray.exceptions.WorkerCrashedError, OOM kill, ...)
                    result = {"key": job["key"], "status": "failed", "error": f"Ray task failed: {type(e).__name__}: {e}"}
                emit("end", result)
                yield result
    finally:
        if started:
            ray.shutdown()
