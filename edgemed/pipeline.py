"""`compress`: load -> plan -> recipe steps -> export -> quantize -> parity -> manifest -> gates.

The CLI is a thin layer over this function; a notebook or a clinic's build script calls it the same way.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemed import __version__
from edgemed.artifact import ArtifactWriter, file_records, utc_now, write_manifest, SCHEMA_VERSION, sha256_file
from edgemed.errors import EdgemedError, GateFailedError
from edgemed.models import CompositeModel, load_model
from edgemed.recipe import Recipe, compose, load_recipe
from edgemed.target import Target, host_target_name, load_target


@dataclass
class Context:
    """What a step sees: the model, the resolved recipe and target, and the artifact being written."""

    cm: CompositeModel
    recipe: Recipe
    target: Target
    work_dir: Path
    progress: Callable[[str], None] = lambda msg: None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # How the runtime must drive the artifact (e.g. kv_cache: shared_buffer), saved in the manifest.
    runtime: dict[str, Any] = field(default_factory=dict)
    # The calibration set a step used (source, count, modalities, sha256 of the sample list).
    calibration: dict[str, Any] | None = None
    # A copy of the model as loaded, kept only while a later `distill` step needs its logits.
    teacher: Any = None

    def describe(self, rel: str, component: str, fmt: str, precision: str | None) -> None:
        self.files[rel] = {"component": component, "format": fmt, "precision": precision}


@dataclass
class CompressResult:
    output: Path
    manifest: dict[str, Any]

    @property
    def status(self) -> str:
        return self.manifest["status"]


def resolve(recipes: list[str | Path] | str, target: str | Path | None) -> tuple[Recipe, Target]:
    names = [recipes] if isinstance(recipes, (str, Path)) else list(recipes)
    recipe = compose([load_recipe(r) for r in names])
    _check_step_order(recipe)
    return recipe, load_target(target or host_target_name())


def _check_step_order(recipe: Recipe) -> None:
    """`distill` recovers from a transform: it needs a prune/MoE step before it."""
    from edgemed.errors import BadInputError
    from edgemed.steps import STEPS

    names = [s.step for s in recipe.steps]
    if "distill" in names:
        before = names[:names.index("distill")]
        if not any(STEPS.get(n).stage == "model" and n != "distill" for n in before):
            raise BadInputError(f"recipe {recipe.name}", "has a distill step with no prune or moe step before it",
                                "compose it after a transform, e.g. --recipe prune-width-25 (which distills itself)")


def tool_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "onnxscript", "gguf",
                "llama-cpp-python", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _source_record(cm: CompositeModel) -> dict[str, Any]:
    files = []
    for f in cm.source_files:
        files.append({"path": f.name, "sha256": sha256_file(f), "bytes": f.stat().st_size})
    local = Path(cm.source)
    where = str(local.resolve()) if local.exists() else getattr(cm.config, "_commit_hash", None)
    return {"model": cm.source, "family": cm.family, "revision_or_path": where, "files": files}


def _save_tokenizer(cm: CompositeModel, out: Path) -> None:
    cm.tokenizer.save_pretrained(out)
    if cm.processor is not None and hasattr(cm.processor, "image_processor"):
        cm.processor.image_processor.save_pretrained(out)


def compress(
    model: str | None,
    recipes: list[str | Path] | str,
    target: str | Path | None,
    output: str | Path,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
    skip_plan: bool = False,
) -> CompressResult:
    """Compress MODEL (None = the bundled demo model) with the recipe(s) for the target.

    Raises BadInputError / InfeasiblePlanError (exit 2) before any heavy work, and GateFailedError
    (exit 3) after writing an artifact whose manifest says `rejected`."""
    from edgemed.demo import resolve_model
    from edgemed.parity import check_parity, evaluate_gates

    say = progress or (lambda msg: None)
    recipe, tgt = resolve(recipes, target)
    writer = ArtifactWriter(output, overwrite=overwrite)  # refuses an existing output before heavy work
    source = resolve_model(model, progress=say)
    plan_dict = None
    if not skip_plan:
        from edgemed.plan import check_feasible, plan

        p = plan(source, recipe, tgt)
        check_feasible(p)
        plan_dict = p.to_dict()
    if recipe.format is None:
        from edgemed.errors import BadInputError

        raise BadInputError(f"recipe {recipe.name}", "has no export step, so it would write no artifact",
                            "add a format recipe, e.g. --recipe int8")
    say(f"load {source}")
    cm = load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    steps = [spec.build() for spec in recipe.steps]
    with writer as tmp:
        ctx = Context(cm=cm, recipe=recipe, target=tgt, work_dir=tmp, progress=say)
        if any(s.name == "distill" for s in steps):
            import copy

            ctx.teacher = copy.deepcopy(cm.model).eval()
        for step in steps:
            say(f"step {step.name}")
            step.run(ctx)
        _save_tokenizer(cm, tmp)
        say("parity against the PyTorch parent")
        from edgemed.runtime import open_session

        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created_utc": utc_now(),
            "edgemed_version": __version__,
            "format": recipe.format,
            "source": _source_record(cm),
            "recipe": recipe.model_dump(mode="json"),
            "target": tgt.model_dump(mode="json"),
            "calibration": ctx.calibration,
            "tools": tool_versions(),
            "model": {
                "family": cm.family,
                "text": cm.text.to_dict(),
                "image": cm.image.to_dict() if cm.image else None,
                "chat_template": cm.chat_template,
                "component_params": cm.component_params(),
            },
            "plan": plan_dict,
            "runtime": ctx.runtime,
            "files": [],
            "parity": None,
            "results": None,
            "status": "ok",
            "status_reason": None,
            "notes": ctx.notes,
        }
        session = open_session(tmp, manifest)
        parity = check_parity(cm, session)
        manifest["parity"] = parity
        if not all(np.isfinite(parity[k]) for k in ("kld_mean", "logits_max_abs_diff")):
            # A broken artifact, whatever the gates say: nothing is written (the temp dir goes).
            raise EdgemedError(f"{recipe.name}: the exported artifact computes non-finite logits "
                               f"(parity {parity['kld_mean']}); this is a bug in edgemed's export for this "
                               "model: please report it with the recipe and the model's config.json")
        # The parent's answers and logits on the gate suite, cached so a device without torch can
        # measure fidelity (edgemed bench), and the flip-rate / closed-accuracy gates measured on it.
        from edgemed.bench.fidelity import cache_parent_reference, compare_with_reference, gate_values

        say("parent reference and gate suite")
        ref_rel = cache_parent_reference(cm, tmp)
        ctx.describe(ref_rel, component="reference", fmt="npz", precision=None)
        gate_suite = compare_with_reference(session, tmp / ref_rel)
        del session
        manifest["gate_suite"] = gate_suite
        failures = evaluate_gates(recipe.gates.active(), {**gate_values(gate_suite), **parity},
                                  reasons={k[:-len("_unavailable_reason")]: v for k, v in gate_suite.items()
                                           if k.endswith("_unavailable_reason")})
        if failures:
            manifest["status"] = "rejected"
            manifest["status_reason"] = "; ".join(failures)
        manifest["files"] = file_records(tmp, ctx.files)
        write_manifest(tmp, manifest)
    result = CompressResult(output=Path(output), manifest=manifest)
    if failures:
        raise GateFailedError(f"{output}: artifact rejected by the recipe's gates: {manifest['status_reason']}")
    return result
