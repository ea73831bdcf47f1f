"""`compress`: load -> plan -> recipe steps -> export -> quantize -> parity -> manifest -> gates.

The CLI is a thin layer over this function; a notebook or a clinic's build script calls it the same way.
"""
from __future__ import annotations

import logging
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgemed.artifact import (ArtifactWriter, Manifest, ModelRecord, SourceFile, SourceRecord, file_records, sha256_file,
                              write_manifest)
from edgemed.errors import EdgemedError, GateFailedError
from edgemed.models import CompositeModel, load_model
from edgemed.recipe import Recipe, compose, load_recipe
from edgemed.context import SCRATCH, Context
from edgemed.target import Target, host_target_name, load_target

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    output: Path
    manifest: Manifest

    @property
    def status(self) -> str:
        return self.manifest.status


DEFAULT_RECIPE = "int8"
DEFAULT_OUTPUT_ROOT = Path("edgemed-out")

RecipeLike = str | Path | Recipe


def resolve(recipes: list[RecipeLike] | RecipeLike | None, target: str | Path | Target | None) -> tuple[Recipe, Target]:
    """The composed recipe (names, YAML files or Recipe objects, in order; None: DEFAULT_RECIPE) and
    the target (a name, YAML file or Target; None: this host's CPU target)."""
    names = [DEFAULT_RECIPE] if recipes is None else [recipes] if isinstance(recipes, (str, Path, Recipe)) \
        else list(recipes)
    recipe = compose([r if isinstance(r, Recipe) else load_recipe(r) for r in names])
    _check_step_order(recipe)
    return recipe, target if isinstance(target, Target) else load_target(target or host_target_name())


def default_output(model: str | None, recipe: Recipe) -> Path:
    """./edgemed-out/<model>-<recipe>: where compress writes when no output is given."""
    from edgemed.demo import DEMO_NAME

    return DEFAULT_OUTPUT_ROOT / f"{Path(model).name if model else DEMO_NAME}-{recipe.name}"


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


def _source_record(cm: CompositeModel) -> SourceRecord:
    files = [SourceFile(path=f.name, sha256=sha256_file(f), bytes=f.stat().st_size) for f in cm.source_files]
    local = Path(cm.source)
    where = str(local.resolve()) if local.exists() else getattr(cm.config, "_commit_hash", None)
    return SourceRecord(model=cm.source, family=cm.family, revision_or_path=where, files=files)


def _save_tokenizer(cm: CompositeModel, out: Path) -> None:
    cm.tokenizer.save_pretrained(out)
    if cm.processor is not None and hasattr(cm.processor, "image_processor"):
        cm.processor.image_processor.save_pretrained(out)


def _teacher(cm: CompositeModel, ctx: Context, **load_kw):
    """The model as loaded, for distillation after a transform: read from the checkpoint's own
    safetensors with the weights left on disk (edgemed.models.streamed: the same fp32 logits,
    memory of one module), or a deep copy where the checkpoint cannot be streamed (a GGUF or
    pickle source, a checkpoint of the model's own code)."""
    import copy

    from edgemed.errors import BadInputError

    if cm.streamed is not None or (cm.source_files and all(f.suffix != ".gguf" for f in cm.source_files)):
        try:
            teacher = load_model(cm.source, low_memory=True, **load_kw)
            ctx.notes.append("distill: the teacher (the model as loaded) is read from the checkpoint while it runs, "
                             "not copied in memory (--low-memory's streamed parent)")
            ctx.teacher_weights = teacher.streamed
            return teacher.model
        except BadInputError as e:
            if cm.streamed is not None:  # loaded so once already: the same checkpoint cannot fail now
                raise
            ctx.notes.append(f"distill: the teacher is a copy in memory ({e.what}: {e.reason})")
    return copy.deepcopy(cm.model).eval()


def compress(
    model: str | None = None,
    recipes: list[RecipeLike] | RecipeLike | None = None,
    target: str | Path | Target | None = None,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
    skip_plan: bool = False,
    vision_tower: str | None = None,
    host_memory_gb: float | None = None,
    low_memory: bool = False,
) -> CompressResult:
    """Compress MODEL (None = the bundled demo model) with the recipe(s) (names, YAML files or Recipe
    objects; None: int8) for the target (None: this host's CPU) into `output` (None: default_output).

    Raises BadInputError / InfeasiblePlanError (exit 2) before any heavy work, and GateFailedError
    (exit 3) after writing an artifact whose manifest says `rejected`. `vision_tower`: the folder of
    the CLIP tower a LLaVA-Med-style checkpoint names in mm_vision_tower (default: that name).
    The plan checks this host's available RAM and free disk first (plan.host_estimate);
    `host_memory_gb` overrides the RAM it is checked against (e.g. where swap is meant to take it).
    `low_memory`: the parent's weights stay on disk and each module reads its own while it runs
    (edgemed.models.streamed): the same artifact, memory of the largest tensor instead of the model;
    recipes whose steps all stream (GGUF) only."""
    from edgemed.demo import resolve_model
    from edgemed.reference.parity import check_parity, evaluate_gates

    say = progress or (lambda msg: None)
    recipe, tgt = resolve(recipes, target)
    if output is None:
        output = default_output(model, recipe)
        output.parent.mkdir(parents=True, exist_ok=True)
    writer = ArtifactWriter(output, overwrite=overwrite)  # refuses an existing output before heavy work
    for p in writer.removed_stale:
        log.warning("removed %s: the temporary folder of an earlier run into %s that was killed", p.name, output)
    source = resolve_model(model, progress=say)
    if low_memory:
        from edgemed.plan import LOW_MEMORY_FIX, streaming_refusal

        if why := streaming_refusal(recipe, tgt):
            from edgemed.errors import BadInputError

            raise BadInputError(f"recipe {recipe.name}", f"cannot run with --low-memory: {why}", LOW_MEMORY_FIX)
    plan_dict = None
    if not skip_plan:
        from edgemed.plan import check_feasible, plan

        p = plan(source, recipe, tgt, vision_tower=vision_tower, host_memory_gb=host_memory_gb, output=output,
                 low_memory=low_memory)
        check_feasible(p)
        plan_dict = p.to_dict()
    if recipe.format is None:
        from edgemed.errors import BadInputError

        raise BadInputError(f"recipe {recipe.name}", "has no export step, so it would write no artifact",
                            "add a format recipe, e.g. --recipe int8")
    say(f"load {source}")
    cm = load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, vision_tower=vision_tower,
                    low_memory=low_memory)
    steps = [spec.build() for spec in recipe.steps]
    with writer as tmp:
        ctx = Context(cm=cm, recipe=recipe, target=tgt, work_dir=tmp, progress=say)
        if low_memory:
            ctx.notes.append("--low-memory: the parent's weights stayed on disk and each module read its own from the "
                             "safetensors while it ran (the same fp32 values, logits and files as in memory)")
        # Everything an artifact is judged by comes from the model the user gave, before any
        # transform: the parity prompts' logits (gates) and the gate suite / device reference.
        from edgemed.reference.cache import cache_parent_reference, compare_with_reference, gate_values
        from edgemed.reference.parent import parity_prompt_logits

        transformed = any(s.stage == "model" for s in steps)
        original = parity_prompt_logits(cm) if transformed else None
        say("parent reference and gate suite")
        ref_rel = cache_parent_reference(cm, tmp)
        ctx.describe(ref_rel, component="reference", fmt="npz", precision=None)
        if any(s.name == "distill" for s in steps):
            ctx.teacher = _teacher(cm, ctx, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                   vision_tower=vision_tower)
        for step in steps:
            say(f"step {step.name}")
            step.run(ctx)
        _save_tokenizer(cm, tmp)
        from edgemed.formats.base import backend_for

        backend_for(recipe, tgt).finish(ctx)
        say("parity against the PyTorch parent")
        from edgemed.reference.parent import parent_parity_refs
        from edgemed.runtime import open_session

        parent_refs = parent_parity_refs(cm)  # before the artifact is opened: never both resident

        manifest = Manifest(
            format=recipe.format,
            source=_source_record(cm),
            recipe=recipe.model_dump(mode="json"),
            target=tgt.model_dump(mode="json"),
            calibration=ctx.calibration,
            tools=tool_versions(),
            model=ModelRecord(family=cm.family, text=cm.text.to_dict(), image=cm.image.to_dict() if cm.image else None,
                              chat_template=cm.chat_template, component_params=cm.component_params()),
            plan=plan_dict,
            runtime=ctx.runtime,
            notes=ctx.notes,
        )
        from edgemed.plan import LOW_MEMORY_PARITY_CONTEXT

        session = open_session(tmp, manifest, **(backend_for(recipe, tgt).low_memory_session_kwargs(
            LOW_MEMORY_PARITY_CONTEXT) if low_memory else {}))
        parity = check_parity(cm, session, original=original, parent=parent_refs)
        manifest.parity = parity
        if not all(np.isfinite(parity[k]) for k in ("kld_mean", "logits_max_abs_diff")):
            # A broken artifact, whatever the gates say: nothing is written (the temp dir goes).
            raise EdgemedError(f"{recipe.name}: the exported artifact computes non-finite logits "
                               f"(parity {parity['kld_mean']}); this is a bug in edgemed's export for this "
                               "model: please report it with the recipe and the model's config.json")
        # The original parent's answers and logits on the gate suite (cached above, so a device without
        # torch measures fidelity against it too) give the flip-rate / closed-accuracy gates.
        gate_suite = compare_with_reference(session, tmp / ref_rel)
        del session
        manifest.gate_suite = gate_suite
        failures = evaluate_gates(recipe.gates.active(), {**gate_values(gate_suite), **parity},
                                  reasons={k[:-len("_unavailable_reason")]: v for k, v in gate_suite.items()
                                           if k.endswith("_unavailable_reason")})
        if failures:
            manifest.status, manifest.status_reason = "rejected", "; ".join(failures)
        shutil.rmtree(tmp / SCRATCH, ignore_errors=True)
        manifest.files = file_records(tmp, ctx.files)
        write_manifest(tmp, manifest)
    result = CompressResult(output=Path(output), manifest=manifest)
    if failures:
        raise GateFailedError(f"{output}: artifact rejected by the recipe's gates: {manifest.status_reason}")
    return result
