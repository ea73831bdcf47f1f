"""The `edgemed` command: a thin layer over the Python API (edgemed.pipeline, plan, artifact)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemed.errors import EdgemedError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress medical multimodal LLMs into verified edge artifacts (ONNX) and check them.")
console = Console()
err = Console(stderr=True)


@app.callback()
def _options(online: bool = typer.Option(False, "--online", help="Let edgemed download from the Hugging Face hub "
                                         "(models, suites). Default: offline, nothing leaves the machine.")):
    import os

    from edgemed._resources import ONLINE_ENV

    if online:
        os.environ[ONLINE_ENV] = "1"


def _progress():
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                    transient=False)


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="Hub id, model folder or .gguf file; omitted: the bundled demo model."),
    recipe: List[str] = typer.Option(None, "--recipe", "-r", help="Recipe name or YAML file; repeat to compose (steps run in order). Default: int8."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target name or YAML file. Default: this host's CPU target."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact folder to create. Default: ./edgemed-out/<model>-<recipes joined by +>."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load pickle (.bin) checkpoints; they can run code when loaded."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model repository's own Python code."),
    vision_tower: Optional[str] = typer.Option(None, "--vision-tower", help="Folder of the CLIP tower that a LLaVA-Med-style checkpoint names in mm_vision_tower."),
    host_memory_gb: Optional[float] = typer.Option(
        None, "--host-memory-gb", help="RAM the plan checks compress against (default: this machine's available memory)."),
    low_memory: bool = typer.Option(
        False, "--low-memory", help="Leave the weights on disk and read one tensor at a time (GGUF; ONNX int4/int8): "
                                    "memory of the largest tensor instead of the whole model in fp32."),
):
    """Compress MODEL with the recipe(s) for the target into an artifact folder with manifest.json."""
    from edgemed.pipeline import compress as run

    with _progress() as prog:
        task = prog.add_task("start", total=None)
        result = run(model, recipe or None, target, output, overwrite=overwrite, allow_pickle=allow_pickle,
                     trust_remote_code=trust_remote_code, progress=lambda m: prog.update(task, description=m),
                     vision_tower=vision_tower, host_memory_gb=host_memory_gb, low_memory=low_memory)
        prog.update(task, description="done")
    _print_artifact(result.manifest, result.output)


def _print_artifact(m, output: Path) -> None:
    t = Table(title=f"{output}  ({m.recipe['name']} for {m.target['name']}, status {m.status})")
    for col in ("file", "component", "precision", "MB"):
        t.add_column(col, justify="right" if col == "MB" else "left")
    for f in m.files:
        if f.component != "support":
            t.add_row(f.path, f.component, str(f.precision), f"{f.bytes / 1e6:.2f}")
    params = m.model.component_params
    parent_mb = sum(params.values()) * 4 / 1e6
    total = sum(f.bytes for f in m.files if f.component not in ("support", "reference")) / 1e6
    t.add_row("[b]total[/b]", "", "", f"{total:.2f}")
    console.print(t)
    # Before / after: the PyTorch parent against this artifact.
    ba = Table(title="before -> after")
    for col in ("", "parent (PyTorch fp32)", "artifact"):
        ba.add_column(col, justify="left" if not col else "right")
    ba.add_row("weights MB", f"{parent_mb:.1f}", f"{total:.1f}")
    g = m.gate_suite or {}
    if g.get("closed_n"):
        ba.add_row(f"gate-suite closed accuracy (n={g['closed_n']})", f"{g['parent_closed_acc']:.3f}",
                   f"{g['closed_acc']:.3f}")
    if g.get("answer_flip_n"):
        ba.add_row(f"answers changed vs parent (n={g['answer_flip_n']})", "-", f"{g['answer_flip_rate']:.3f}")
    console.print(ba)
    p = m.parity or {}
    if p:
        line = (f"parity vs PyTorch parent over {p['prefill']['positions']} positions: "
                f"KLD mean {p['kld_mean']:.3g}, p99 {p['kld_p99']:.3g}, top-1 agreement {p['top1_agreement']:.3f}, "
                f"max |dlogits| {p['logits_max_abs_diff']:.3g}")
        if "vision_cosine_min" in p:
            line += f", vision cosine min {p['vision_cosine_min']:.5f}"
        console.print(line)


@app.command()
def plan(
    model: Optional[str] = typer.Argument(None, help="Hub id or folder (config.json alone is enough); omitted: the demo model."),
    recipe: List[str] = typer.Option(None, "--recipe", "-r", help="Recipe name or YAML file (repeatable)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target name or YAML file."),
    context: Optional[int] = typer.Option(
        None, help="Context length (tokens) for the KV-cache estimate; default 2048, or the longest that fits "
                   "the target if that still holds one image and a short exchange."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    vision_tower: Optional[str] = typer.Option(None, "--vision-tower", help="Folder of the CLIP tower that a LLaVA-Med-style checkpoint names in mm_vision_tower."),
    host_memory_gb: Optional[float] = typer.Option(
        None, "--host-memory-gb", help="RAM of the machine that will run compress (default: this machine's available memory)."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Plan compress --low-memory (weights left on disk)."),
):
    """Check recipe x target x model before any heavy work: sizes, memory, decode ceiling, and the
    RAM and disk that compress needs on the host."""
    from edgemed.demo import resolve_model
    from edgemed.pipeline import resolve
    from edgemed.plan import check_feasible, plan as make_plan

    r, tgt = resolve(recipe or None, target)
    p = make_plan(resolve_model(model), r, tgt, context_tokens=context, vision_tower=vision_tower,
                  host_memory_gb=host_memory_gb, low_memory=low_memory)
    if json_out:
        console.print_json(json.dumps(p.to_dict()))
    else:
        t = Table(title=f"plan: {p.to_dict().get('model')} with {r.name} on {tgt.name}")
        rows = p.table_rows()
        for col in ("component", "params (M)", "precision", "MB"):
            t.add_column(col)
        for row in rows:
            t.add_row(*[str(x) for x in row])
        console.print(t)
        d = p.to_dict()
        for k in ("artifact_mb", "kv_cache_mb", "kv_bytes_per_element", "kv_copies", "runtime_memory_mb",
                  "usable_memory_mb", "bytes_per_token_mb", "decode_ceiling_tok_s", "context_tokens"):
            if k in d:
                console.print(f"{k}: {d[k]}")
        for c, e in d["components"].items():
            if e.get("note"):
                console.print(f"{c}: {e['note']}")
        for n in d["notes"]:
            console.print(f"note: {n}")
        h = d["host"]
        console.print(f"host: compress needs about {h['peak_ram_gb']} GB of RAM ("
                      + ", ".join(f"{k} {v}" for k, v in h["parts_gb"].items())
                      + f") and {h['disk_gb']} GB of disk; {h['memory_source']}: {h['memory_gb']} GB")
        if h.get("mapped_gb"):
            console.print(f"host: parity maps the {h['mapped_gb']} GB artifact besides (page cache the kernel can take back)")
        for n in h.get("notes") or []:
            console.print(f"note: {n}")
    check_feasible(p)
    if not json_out:  # --json prints one JSON document (its "feasible" says the same)
        console.print("[green]feasible[/green]")


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., help="An artifact folder written by `edgemed compress`."),
    verify: bool = typer.Option(False, "--verify", help="Recompute every file's sha256; exit 2 on any change."),
):
    """Show an artifact's manifest summary; with --verify, check every file against it."""
    from edgemed.artifact import read_manifest
    from edgemed.runtime import check_artifact

    m = read_manifest(artifact)
    _print_artifact(m, artifact)
    if verify:
        check_artifact(artifact, m, allow_rejected=True)  # what runtime.load checks (a rejected one is shown too)
        console.print(f"[green]verified[/green]: {len(m.files)} files match manifest.json")


@app.command()
def bench(
    artifact: Path = typer.Argument(..., help="An artifact folder written by `edgemed compress`."),
    suite: List[str] = typer.Option(None, "--suite", "-s", help="Suite NAME or NAME=PATH (local copy in the hub layout); repeatable. "
                                    "Names: synthetic-cxr, vqa-rad, slake, pathvqa, medqa, pubmedqa."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="report.json to write (report.md and PNG plots go beside it). "
                                          "Default: ./bench-<artifact>/report.json."),
    runs: int = typer.Option(10, "--runs", help="Measured latency requests (after the warm-up)."),
    warmup: int = typer.Option(2, "--warmup", help="Unmeasured warm-up requests."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens decoded per latency request (greedy, EOS ignored)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N items of each suite (reproducible subsets)."),
    split: Optional[str] = typer.Option(None, "--split", help="Suite split (default: test; pubmedqa: train)."),
    with_report: List[Path] = typer.Option(None, "--with", help="Other report.json files to put on the Pareto plot; repeatable."),
    bandwidth_gb_s: Optional[float] = typer.Option(None, "--bandwidth-gb-s", help="Use this memory bandwidth for the roofline instead of measuring."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's sha256 before running (sizes and paths are always checked)."),
    allow_rejected: bool = typer.Option(False, "--allow-rejected", help="Run an artifact its recipe's gates rejected."),
    device: str = typer.Option("auto", "--device", help="auto (the target's GPU when this machine can run it there, "
                               "else the CPU), cpu, or cuda (exit 2 without a GPU or a GPU runtime)."),
):
    """Measure an artifact on this machine: accuracy, fidelity, latency, memory, energy, roofline."""
    from edgemed.bench import run_bench

    output = output or Path(f"bench-{artifact.resolve().name}") / "report.json"
    with _progress() as prog:
        task = prog.add_task("start", total=None)
        report = run_bench(artifact, suite or [], output=output, runs=runs, warmup=warmup,
                           max_new_tokens=max_new_tokens, limit=limit, split=split, with_reports=with_report or [],
                           bandwidth_gb_s=bandwidth_gb_s, verify=verify, allow_rejected=allow_rejected,
                           device=device, progress=lambda m: prog.update(task, description=m))
        prog.update(task, description="done")
    lat, fid, roof = report["latency"], report["fidelity"], report["roofline"]
    f = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    console.print(f"TTFT p50 {f(lat['ttft_ms']['p50'])} ms, p90 {f(lat['ttft_ms']['p90'])} ms; decode {f(lat['decode_tok_s'])} tok/s "
                  f"({f(roof.get('fraction'))} of the {f(roof.get('decode_ceiling_tok_s'))} tok/s roofline); "
                  f"peak RSS {f(report['memory']['peak_rss_mb'])} MB; ran on {report['device']['ran_on']} "
                  f"({report['device']['reason']})")
    console.print(f"fidelity: KLD mean {f(fid.get('kld_mean'))}, top-1 agreement {f(fid.get('top1_agreement'))}, "
                  f"flip rate {f(fid.get('answer_flip_rate'))}; energy: "
                  f"{f(report['energy'].get('joules_per_token'))} J/token"
                  + (f" ({report['energy']['energy_unavailable_reason']})" if report["energy"].get("energy_unavailable_reason") else ""))
    for name, b in report["accuracy"].items():
        console.print(f"{name}: n={b['n']} {b.get('headline_metric')} {f(b.get('headline'))} 95% CI {b.get('ci95')}")
    console.print(f"wrote {output} and {output.parent / 'report.md'}")


@app.command()
def recipes(show: Optional[str] = typer.Option(None, "--show", help="Print this recipe's resolved YAML (every default filled in).")):
    """List the shipped recipes, one line each."""
    from edgemed._resources import shipped_names
    from edgemed.recipe import load_recipe

    if show:
        typer.echo(load_recipe(show).to_yaml().rstrip())
        return
    for name in shipped_names("recipes"):
        r = load_recipe(name)
        fmt = r.format or "transform"
        first = " ".join(r.description.split()).split(". ")[0].rstrip(".")
        typer.echo(f"{name:<16} {fmt:<9} {first}")


@app.command()
def targets():
    """List the shipped targets, one line each."""
    from edgemed._resources import shipped_names
    from edgemed.target import load_target

    for name in shipped_names("targets"):
        t = load_target(name)
        acc = t.accelerator.compute_capability or t.accelerator.name if t.accelerator else "cpu"
        typer.echo(f"{name:<22} {t.memory_gb:>5g} GB  {t.memory_bandwidth_gb_s:>6g} GB/s  {acc:<8} "
                   f"{','.join(t.formats)}")


calib_app = typer.Typer(no_args_is_help=True, help="Calibration sets: the medical images and prompts recipes calibrate with.")
app.add_typer(calib_app, name="calib")


@calib_app.command("build")
def calib_build(
    source: str = typer.Argument(..., help="A folder of images (DICOM/NIfTI/PNG/JPEG, searched recursively), or 'synthetic-cxr'."),
    output: Path = typer.Option(..., "--output", "-o", help="The set folder to create (must not exist)."),
    count: int = typer.Option(64, "--count", "-n", help="Images to select, stratified by modality."),
    seed: int = typer.Option(0, "--seed", help="Seed for the selection (and for synthetic-cxr's images)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts: .jsonl ({\"prompt\", optional \"image\", \"answer\"} per line) or .txt (one per line)."),
):
    """Build a calibration set: images re-encoded as PNG (no metadata), prompts.jsonl, calibration.json."""
    from edgemed.calibration.sets import build_calibration_set

    with _progress() as prog:
        task = prog.add_task("start", total=None)
        m = build_calibration_set(source, output, count=count, seed=seed, prompts=prompts,
                                  progress=lambda msg: prog.update(task, description=msg))
        prog.update(task, description="done")
    mods = ", ".join(f"{k} {v}" for k, v in m["modalities"].items())
    skipped = f"; skipped {m['skipped_unreadable']} unreadable file(s)" if m["skipped_unreadable"] else ""
    console.print(f"wrote {output}: {m['count']} images ({mods}){skipped}; sha256 {m['sha256'][:16]}")


@app.command("build-engine")
def build_engine(
    artifact: Path = typer.Argument(..., help="A tensorrt artifact folder (recipes trt-fp16, trt-int8, trt-int4-awq, trt-fp8)."),
    graph: List[str] = typer.Option(None, "--graph", help="Build only this graph (e.g. decoder_model_merged.onnx); repeatable."),
    force: bool = typer.Option(False, "--force", help="Rebuild engines that already exist."),
):
    """On the device: build TensorRT engines from the artifact's Q/DQ ONNX and hash them into its manifest."""
    from edgemed.formats.tensorrt.engine import build_engines

    with _progress() as prog:
        task = prog.add_task("start", total=None)
        rec = build_engines(artifact, graphs=graph or None, force=force, progress=lambda m: prog.update(task, description=m))
        prog.update(task, description="done")
    b = rec["build"]
    console.print(f"built {len(rec['engines'])} engine(s) with TensorRT {b['tensorrt']} (CUDA {b['cuda_runtime']}, "
                  f"{b['gpu']} {b['compute_capability']}, L4T {b['l4t']}, power mode "
                  f"{(b['power_mode'] or {}).get('summary')}); manifest updated")


@app.command()
def convert(
    model: str = typer.Argument(..., help="Model folder (e.g. LLaVA-Med v1.5 as published) or hub id."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write (a plain Hugging Face model folder)."),
    vision_tower: Optional[str] = typer.Option(None, "--vision-tower", help="Folder of the CLIP tower the checkpoint names in mm_vision_tower."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load pickle (.bin) checkpoints; they can run code when loaded."),
):
    """Write MODEL, normalised into its edgemed family, as a transformers folder (safetensors)."""
    from edgemed.models.convert import convert as run

    with _progress() as prog:
        task = prog.add_task("load", total=None)
        out = run(model, output, vision_tower=vision_tower, overwrite=overwrite, allow_pickle=allow_pickle,
                  progress=lambda m: prog.update(task, description=m))
        prog.update(task, description="done")
    console.print(f"wrote {out}: a transformers model folder (AutoModelForImageTextToText / AutoProcessor load it)")


@app.command()
def serve(
    artifact: Path = typer.Argument(..., help="Artifact folder (verified before it is served)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs --api-key."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGEMED_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every /v1 request."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id clients send (default: the folder's name)."),
    queue_size: int = typer.Option(8, "--queue-size", help="Requests waiting or running; more get 503 with Retry-After."),
    device: str = typer.Option("auto", "--device", help="auto (the target's GPU when this machine can run it there, "
                               "else the CPU), cpu, or cuda."),
):
    """OpenAI-compatible local server: POST /v1/chat/completions (text, image_url data: URIs, DICOM,
    stream), GET /v1/models, GET /health. Loopback by default."""
    from edgemed.serve import serve as run

    run(artifact, host=host, port=port, api_key=api_key, model_name=model_name, queue_size=queue_size, device=device)


@app.command()
def sweep(
    model: Optional[str] = typer.Argument(None, help="Hub id, model folder or .gguf file; omitted: the bundled demo model."),
    recipe: List[str] = typer.Option(..., "--recipe", "-r", help="Recipe to try (repeatable); compose with +, e.g. prune-width-25+q8_0."),
    target: List[str] = typer.Option(..., "--target", "-t", help="Target to plan for (repeatable)."),
    suite: List[str] = typer.Option(None, "--suite", "-s", help="Suite NAME or NAME=PATH to measure accuracy on (repeatable); "
                                    "default: the built-in gate suite."),
    out: Path = typer.Option(Path("edgemed-sweep"), "--out", "-o", help="Folder for artifacts, reports, sweep.json and sweep.md."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Compress/bench jobs at once (also bounded by this host's RAM)."),
    engine: str = typer.Option("auto", "--engine", help="auto (Ray when installed, else a process pool), ray, or process."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="A running Ray cluster (shared storage for --out)."),
    host_memory_gb: Optional[float] = typer.Option(None, "--host-memory-gb", help="RAM the plans check compress against."),
    runs: int = typer.Option(5, help="Latency runs per artifact."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N items of each suite."),
):
    """Plan every recipe x target, compress each distinct artifact once, bench it here, and name per
    target the smallest artifact that passes every gate. Rerunning resumes."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgemed.sweep import sweep as run

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err) as prog:
        bars: dict[str, int] = {}

        def show(kind: str, payload: dict) -> None:
            if kind == "planned" and not payload["feasible"]:
                err.print(f"refused: {payload['recipe']} on {payload['target']}: {'; '.join(payload['reasons'])[:300]}")
            elif kind == "start":
                bars[payload["key"]] = prog.add_task(f"{payload['key']}: compress + bench", total=None)
            elif kind == "end":
                if payload["key"] not in bars:
                    bars[payload["key"]] = prog.add_task(payload["key"], total=1)
                done = "done" if payload.get("status") == "done" else f"failed: {payload.get('error', '')[:120]}"
                prog.update(bars[payload["key"]], description=f"{payload['key']}: {done}", total=1, completed=1)

        summary = run(model, recipe, target, out, suites=suite or [], jobs=jobs, engine=engine, ray_address=ray_address,
                      host_memory_gb=host_memory_gb, runs=runs, limit=limit, progress=show)
    t = Table(title=f"sweep: {out / 'sweep.md'}")
    for col in ("recipe", "target", "status", "MB", "KLD mean", "host tok/s", "target tok/s (plan)"):
        t.add_column(col)
    for r in summary["rows"]:
        t.add_row(r["recipe"], r["target"], r["status"], f"{r['size_mb']:.1f}" if r.get("size_mb") else "",
                  f"{r['kld_mean']:.3g}" if r.get("kld_mean") is not None else "",
                  f"{r['host_decode_tok_s']:.1f}" if r.get("host_decode_tok_s") else "",
                  f"{r['predicted_decode_tok_s']:.1f}" if r.get("predicted_decode_tok_s") else "")
    console.print(t)
    for tgt, c in summary["choice"].items():
        console.print(f"{tgt}: " + (f"[green]{c['recipe']}[/green] ({c['size_mb']:.1f} MB)" if c.get("recipe") else c["reason"]))


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps edgemed's errors to the exit codes of DESIGN.md. Usage errors (an unknown
    option, a missing argument) are click's own: usage and the error on stderr, exit code 2."""
    import os

    from edgemed._resources import ONLINE_ENV

    args = sys.argv[1:] if argv is None else list(argv)
    if "--online" not in args and os.environ.get(ONLINE_ENV) != "1":
        # Before huggingface_hub is imported: it reads these once. edgemed passes local_files_only
        # itself; this keeps every other hub call (telemetry, update checks) off the network too.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import signal
    import threading

    def terminated(signum, frame):
        # A job scheduler's or `kill`'s SIGTERM unwinds like an error: the temporary sibling a
        # compress writes in (a 7B's fp32 decoder: 28 GB) is removed now, not at the next run.
        raise SystemExit(128 + signum)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        app(args=args, standalone_mode=True)
        return 0
    except EdgemedError as e:
        from rich.markup import escape

        err.print(f"[red]error[/red] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
        return e.exit_code
    except SystemExit as e:  # standalone click: success, --help, usage errors (2), typer.Exit(code); SIGTERM
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
