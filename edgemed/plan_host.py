"""The host that runs `edgemed compress`: its memory, the estimate record, the check against it,
and which recipes can run with the weights left on disk. edgemed.plan computes the parts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edgemed.recipe import Recipe

GB = 1e9


class HostEstimate(BaseModel):
    """What `edgemed compress` needs of the machine that runs it (sizes in bytes)."""

    memory_bytes: int  # RAM the estimate is checked against
    memory_source: str  # where memory_bytes came from
    disk_free_bytes: int | None  # free space where the artifact is written (None: not checked)
    peak_ram_bytes: int
    disk_bytes: int  # the artifact plus compress's scratch beside it
    parts: dict[str, int]  # what the peak is made of
    feasible: bool
    reasons: list[str] = []
    low_memory: bool = False  # compress --low-memory: the weights stay on disk
    # Files compress maps besides the peak (the GGUF artifact llama.cpp runs in parity): resident
    # while read, so in RSS, but page cache the kernel takes back under pressure, not a need.
    mapped_bytes: int = 0
    notes: list[str] = []

    def to_dict(self) -> dict[str, Any]:
        return {"memory_gb": round(self.memory_bytes / GB, 2), "memory_source": self.memory_source,
                "weights": "on disk (--low-memory)" if self.low_memory else "in memory (fp32)",
                "disk_free_gb": None if self.disk_free_bytes is None else round(self.disk_free_bytes / GB, 2),
                "peak_ram_gb": round(self.peak_ram_bytes / GB, 2), "disk_gb": round(self.disk_bytes / GB, 2),
                "parts_gb": {k: round(v / GB, 2) for k, v in self.parts.items()},
                "mapped_gb": round(self.mapped_bytes / GB, 2),
                "feasible": self.feasible, "reasons": list(self.reasons), "notes": list(self.notes)}


# Python with torch, transformers and ONNX Runtime imported, before any weights (bench_memory.py).
HOST_PROCESS_BYTES = 900_000_000
# Left free for the OS and everything else on the host.
HOST_MARGIN_FRACTION = 0.05
# --low-memory: x the largest tensor in fp32 (its fp32 conversion, the writer's converted copy, a
# forward's output); fitted by bench/bench_memory.py (the streamed phases of a 22-layer
# TinyLlama shape peaked 0.48 GB above the process with a 0.26 GB largest tensor).
HOST_STREAM_FACTOR = 2.0
# The context of compress --low-memory's parity session (the parity prompts and gate suite fit).
LOW_MEMORY_PARITY_CONTEXT = 2048
LOW_MEMORY_FIX = ("use a recipe that streams (GGUF: q4_k_m, q8_0, ...; ONNX: int4, int4-fast, int4-gptq, int8, "
                  "int8-mse; prune-width-25 before either) with --low-memory, or compress without it")
STREAM_PART = "streamed parent (largest tensors) or the artifact and its KV cache in parity, the larger"


def host_memory_available(cgroup: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """This machine's available memory now (MemAvailable: free plus what the kernel can reclaim),
    or less where a memory cgroup of this process (a container, a CI job, `docker run --memory`)
    caps it: /proc/meminfo shows the whole machine inside a container."""
    import psutil

    available = int(psutil.virtual_memory().available)
    room = cgroup_headroom(cgroup, proc_cgroup)
    return available if room is None else min(available, room)


# cgroup v2 and v1 file names: the limit, the usage, and memory.stat's reclaimable page-cache line.
_CGROUP_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
                 1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def cgroup_headroom(cgroup: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The least room left under the memory limits of this process's cgroup and its ancestors (a
    limit can sit on a parent: a CI job's slice), each its limit less its usage less the inactive
    page cache the kernel drops before it fails an allocation; None where no limit applies.
    cgroup v2 (`0::/path` under the unified mount) and v1 (`N:memory:/path` under `memory/`); a
    namespaced container sees its own cgroup at the mount's root, which is read too."""
    dirs = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        num, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        version = 2 if num == "0" and controllers == "" else 1 if "memory" in controllers.split(",") else 0
        if version:
            mount = cgroup if version == 2 and (cgroup / "cgroup.controllers").exists() else \
                cgroup / ("unified" if version == 2 else "memory")
            here = mount / path.strip("/")
            dirs += [(version, d) for d in (here, *here.parents) if d == mount or mount in d.parents]
    dirs += [(2, cgroup), (1, cgroup / "memory")]  # a namespaced container's own cgroup
    rooms = []
    for version, d in dict.fromkeys(dirs):
        limit_file, usage_file, inactive = _CGROUP_FILES[version]
        try:
            limit = (d / limit_file).read_text().strip()
            used = int((d / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 1 << 60:  # "max" (v2) or v1's page-rounded 2^63
            continue
        try:
            stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
            used -= int(stat.get(inactive, 0))
        except (OSError, ValueError):
            pass
        rooms.append(int(limit) - max(0, used))
    return min(rooms) if rooms else None


def streaming_refusal(recipe: Recipe, target=None) -> str | None:
    """Why this recipe cannot run with the weights left on disk (None: it can): a step must say it
    reads weights only through the parent's forward and CompositeModel.weight_reader (Step.streams),
    and its arguments must not need the whole model (Step.stream_refusal)."""
    from edgemed.steps import STEPS

    from edgemed.transforms.distill_local import RECOVERS

    for i, spec in enumerate(recipe.steps):
        if not getattr(STEPS.get(spec.step), "streams", False):
            return f"its step {spec.step} needs the whole model in memory"
        if why := spec.build().stream_refusal(target):
            return f"its step {spec.step}: {why}"
        transforms = [s.step for s in recipe.steps[:i] if STEPS.get(s.step).stage == "model"]
        if spec.step == "distill" and not set(transforms) <= set(RECOVERS):
            return (f"its step distill recovers only {', '.join(RECOVERS)} layer by layer with the weights on disk "
                    f"(after {', '.join(transforms)} it trains the whole student)")
    return None


def _host_check(parts: dict[str, int], disk: int, host_memory_gb: float | None,
                output: str | Path | None, low_memory: bool = False, mapped: int = 0) -> HostEstimate:
    import shutil

    peak = sum(parts.values())
    if host_memory_gb is not None:
        memory, source = int(host_memory_gb * GB), "--host-memory-gb"
    else:
        memory, source = host_memory_available(), "available memory of this machine"
    where = Path(output) if output is not None else Path.cwd()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free if host_memory_gb is None else None
    reasons = []
    if peak > memory * (1 - HOST_MARGIN_FRACTION):
        biggest = max((k for k in parts if k != "process"), key=parts.get)
        reasons.append(f"compress needs about {peak / GB:.1f} GB of RAM ({', '.join(f'{k} {v / GB:.1f}' for k, v in parts.items())}), "
                       f"but {source} is {memory / GB:.1f} GB (largest part: {biggest})")
    if free is not None and disk > free:
        reasons.append(f"compress needs about {disk / GB:.1f} GB of disk at {where}, which has {free / GB:.1f} GB free")
    notes = []
    if mapped and peak + mapped > memory * (1 - HOST_MARGIN_FRACTION):
        notes.append(f"parity maps the {mapped / GB:.1f} GB artifact and {source} leaves less beside the peak: the kernel "
                     "drops its pages and reads them again each pass (slower, not failing)")
    return HostEstimate(memory_bytes=memory, memory_source=source, disk_free_bytes=free, peak_ram_bytes=peak,
                        disk_bytes=disk, parts=parts, feasible=not reasons, reasons=reasons, low_memory=low_memory,
                        mapped_bytes=mapped, notes=notes)
