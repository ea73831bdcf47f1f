"""`edgemed build-engine`: TensorRT engines from a tensorrt artifact's Q/DQ ONNX, on the device.

Engines are specific to the GPU and the TensorRT version, so they are built where they run, from
the graphs and build profiles the host wrote (edgemed.formats.tensorrt.steps). Each engine is hashed into
manifest.json next to the versions that built it (TensorRT, CUDA, JetPack/L4T, the GPU, nvpmodel),
so `edgemed inspect --verify` covers the engines too.

Only this module and edgemed.formats.tensorrt.session import tensorrt, and only when called.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Callable

from edgemed.artifact import FileRecord, Manifest, read_manifest, sha256_file, utc_now, write_manifest
from edgemed.errors import BadInputError, EdgemedError, MissingDependencyError

L4T_RELEASE = Path("/etc/nv_tegra_release")


def import_tensorrt():
    """The tensorrt module, or MissingDependencyError (exit 2) saying where it comes from."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(
            "build-engine: TensorRT is not installed on this machine (engines are built on the device "
            "that runs them: a Jetson with JetPack, or a PC with an NVIDIA GPU)", "tensorrt", extra="tensorrt") from None
    return trt


def device_facts(trt=None) -> dict[str, Any]:
    """TensorRT, CUDA, GPU, JetPack/L4T and power-mode facts of this machine (None where unknown)."""
    facts: dict[str, Any] = {"tensorrt": getattr(trt, "__version__", None), "host": platform.node(),
                             "arch": platform.machine(), "cuda_runtime": None, "cuda_driver": None,
                             "gpu": None, "compute_capability": None, "l4t": None, "power_mode": None}
    try:
        from edgemed.formats.tensorrt.session import cuda_check, load_cudart

        cudart = load_cudart()
        v = int(cuda_check(cudart.cudaRuntimeGetVersion()))
        facts["cuda_runtime"] = f"{v // 1000}.{v % 1000 // 10}"
        v = int(cuda_check(cudart.cudaDriverGetVersion()))
        facts["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}"
        prop = cuda_check(cudart.cudaGetDeviceProperties(0))
        name = prop.name
        facts["gpu"] = name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
        facts["compute_capability"] = f"sm_{prop.major}{prop.minor}"
    except Exception:  # cuda-python absent or no device: the build itself will say more
        pass
    if L4T_RELEASE.is_file():
        # e.g. "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ..."
        facts["l4t"] = L4T_RELEASE.read_text(errors="replace").splitlines()[0].lstrip("# ").strip()
    try:
        from edgemed.host import read_power_mode

        pm = read_power_mode()
        facts["power_mode"] = None if pm is None else {"summary": str(pm), "name": pm.nvpmodel, "id": pm.nvpmodel_id,
                                                       "jetson_clocks": pm.jetson_clocks}
    except Exception:
        pass
    return facts


def build_engines(artifact: str | Path, *, graphs: list[str] | None = None, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build one engine per graph with the manifest's profiles, flags and workspace; hash them into
    the manifest. Returns manifest['runtime']['trt'] after the build."""
    say = progress or (lambda msg: None)
    root = Path(artifact)
    manifest = read_manifest(root)
    if manifest.format != "tensorrt":
        raise BadInputError(str(root), f"artifact format is '{manifest.format}', not tensorrt",
                            "compress with a TensorRT recipe first (trt-fp16, trt-int8, trt-int4-awq, trt-fp8)")
    trt = import_tensorrt()  # first: on a host without TensorRT, that is the message that helps
    trt_rec = manifest.runtime.get("trt")
    if not trt_rec or not trt_rec.get("graphs"):
        raise BadInputError(str(root), "manifest.json has no TensorRT build profiles (runtime.trt)",
                            "re-create the artifact with this edgemed version")
    from edgemed.formats.tensorrt.profiles import validate_profiles

    problems = validate_profiles(trt_rec, root)
    if problems:
        raise BadInputError(str(root), "build profiles do not match the graphs: " + "; ".join(problems))
    wanted = graphs or list(trt_rec["graphs"])
    unknown = set(wanted) - set(trt_rec["graphs"])
    if unknown:
        raise BadInputError("--graph", f"unknown graph(s) {sorted(unknown)}", f"use one of {list(trt_rec['graphs'])}")
    existing = trt_rec.get("engines") or {}
    if existing and not force and all((root / existing.get(g, "")).is_file() for g in wanted):
        raise BadInputError(str(root), "engines are already built", "pass --force to rebuild them")

    logger = trt.Logger(trt.Logger.WARNING)
    built: dict[str, str] = dict(existing)
    timings: dict[str, float] = {}
    import time

    for graph in wanted:
        entry = trt_rec["graphs"][graph]
        say(f"build {entry['engine']} from {graph} ({', '.join(entry['precision_flags']) or 'fp32'})")
        t0 = time.perf_counter()
        plan = _build_one(trt, logger, root / graph, entry)
        out = root / entry["engine"]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".engine.tmp")
        tmp.write_bytes(plan)
        tmp.replace(out)
        built[graph] = entry["engine"]
        timings[graph] = round(time.perf_counter() - t0, 1)

    trt_rec["engines"] = built
    trt_rec["build"] = {"built_utc": utc_now(), "build_s": timings, **device_facts(trt)}
    manifest.runtime["trt"] = trt_rec
    manifest.tools["tensorrt"] = trt.__version__
    _record_engine_files(root, manifest, built, trt_rec["graphs"])
    # Keep trt_profiles.json as the host wrote it (it is hashed); the build record lives in the manifest.
    write_manifest(root, manifest)
    return trt_rec


def _build_one(trt, logger, onnx_path: Path, entry: dict[str, Any]) -> bytes:
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x; implicit in 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data (.onnx.data) beside the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgemedError(f"{onnx_path.name}: TensorRT's ONNX parser failed: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(entry["workspace_bytes"]))
    skipped = []
    for name in entry["precision_flags"]:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:  # e.g. INT4 has no flag in some 10.x releases: Q/DQ types decide
            skipped.append(name)
            continue
        config.set_flag(flag)
    for prof in entry["profiles"]:
        profile = builder.create_optimization_profile()
        for inp, mom in prof["shapes"].items():
            profile.set_shape(inp, tuple(mom["min"]), tuple(mom["opt"]), tuple(mom["max"]))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EdgemedError(f"{onnx_path.name}: TensorRT could not build an engine (flags "
                           f"{entry['precision_flags']}, skipped {skipped}); see the TensorRT log above")
    return bytes(plan)


def _record_engine_files(root: Path, manifest: Manifest, built: dict[str, str], graphs: dict[str, Any]) -> None:
    records = [f for f in manifest.files if f.path not in set(built.values())]
    for graph, rel in built.items():
        p = root / rel
        prec = "+".join(sorted(set(graphs[graph].get("precisions", {}).values()))) or "fp32"
        component = next((f.component for f in records if f.path == graph), None)
        records.append(FileRecord(path=rel, sha256=sha256_file(p), bytes=p.stat().st_size, component=component,
                                  format="tensorrt-engine", precision=prec))
    manifest.files = records


def load_profiles(artifact: str | Path) -> dict[str, Any]:
    """trt_profiles.json of an artifact (the same profiles as manifest.json runtime.trt)."""
    return json.loads((Path(artifact) / "trt_profiles.json").read_text())
