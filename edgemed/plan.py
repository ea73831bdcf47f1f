"""Plan: is this recipe x target x model feasible, and what will it cost? Decided from the
model's config alone (parameter counts on the meta device), before any weights are loaded.

    artifact bytes   = sum over components of params x effective bits per weight / 8
    KV-cache bytes   = 2 (K and V) x layers x kv_heads x head_dim x context_tokens x bytes per element
    run-time memory  = (weights + KV x copies) x 1.10 + 300 MB   (copies: 2 where a decoder step
                       holds past and present caches at once, see _kv_copies)
    bytes per token  = language + lm_head weights + one embedding row + the whole KV cache at context
    decode ceiling   = memory_bandwidth_gb_s x 1e9 / bytes per token   (the roofline, tok/s)

Every number is an estimate of the artifact the shipped exporters write; `edgemed bench`
measures the real ones (report.json `roofline.fraction` compares the two).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edgemed.errors import BadInputError, EdgemedError, InfeasiblePlanError
from edgemed.formats.base import RUNTIME_OVERHEAD_FIXED_BYTES, backend_for
from edgemed.recipe import COMPONENTS, PRECISION_BITS, Recipe
from edgemed.target import Target
from edgemed.plan_host import (HOST_MARGIN_FRACTION, HOST_PROCESS_BYTES, HOST_STREAM_FACTOR,  # noqa: F401
                               LOW_MEMORY_FIX, LOW_MEMORY_PARITY_CONTEXT, STREAM_PART, HostEstimate, _host_check,
                               host_memory_available, streaming_refusal)

# Activations, the runtime's arena and fragmentation grow with the model (largest matmul
# outputs, the image tokens' prefill, logits over the vocabulary): 10% of weights + KV. The
# fixed part is the process itself (RUNTIME_OVERHEAD_FIXED_BYTES, edgemed.formats.base).
RUNTIME_OVERHEAD_FRACTION = 0.10
# Every target can run the fp32 reference on its CPU, listed or not.
ALWAYS_RUNNABLE = {"fp32", "f32"}

# The shortest context worth suggesting: a question and a short answer (plus one image's tokens).
MIN_TURN_TOKENS = 256
# The context a plan assumes when none is given, unless only a shorter one fits the target.
DEFAULT_CONTEXT_TOKENS = 2048

MB = 1e6
GB = 1e9


class ComponentEstimate(BaseModel):
    params: int
    precision: str
    bits_per_weight: float  # effective: includes block scales and zero points
    bytes: int  # stored in the artifact
    read_per_token: bool  # streamed from memory for every decoded token
    note: str = ""


class Plan(BaseModel):
    """The planner's verdict for one model x recipe x target (sizes in bytes; to_dict gives MB)."""

    model: str
    family: str
    recipe: str
    target: str
    format: str | None
    context_tokens: int
    components: dict[str, ComponentEstimate]
    artifact_bytes: int
    kv_cache_bytes: int
    kv_copies: int = 1  # caches alive at once (2 where the decoder concatenates past and present)
    kv_bytes_per_element: int
    runtime_overhead_bytes: int
    runtime_memory_bytes: int
    usable_memory_bytes: int
    bytes_per_token: int
    memory_bandwidth_gb_s: float
    decode_ceiling_tok_s: float
    feasible: bool
    reasons: list[str] = []
    fixes: list[str] = []
    notes: list[str] = []
    host: HostEstimate | None = None  # the compressing machine's side (None: not asked)

    @property
    def total_params(self) -> int:
        return sum(c.params for c in self.components.values())

    def table_rows(self) -> list[tuple[str, str, str, str]]:
        """Rows for a table with columns (component, params (M), precision, MB), then a total."""
        rows = [(name, f"{c.params / 1e6:,.1f}", c.precision, f"{c.bytes / MB:,.1f}")
                for name, c in self.components.items()]
        rows.append(("total", f"{self.total_params / 1e6:,.1f}", "", f"{self.artifact_bytes / MB:,.1f}"))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; sizes in MB (1e6 bytes), key names as in report.json where they overlap."""
        return {
            "model": self.model,
            "family": self.family,
            "recipe": self.recipe,
            "target": self.target,
            "format": self.format,
            "context_tokens": self.context_tokens,
            "components": {
                name: {"params": c.params, "precision": c.precision, "bits_per_weight": round(c.bits_per_weight, 4),
                       "mb": round(c.bytes / MB, 1), "read_per_token": c.read_per_token,
                       **({"note": c.note} if c.note else {})}
                for name, c in self.components.items()
            },
            "total_params": self.total_params,
            "artifact_mb": round(self.artifact_bytes / MB, 1),
            "kv_cache_mb": round(self.kv_cache_bytes / MB, 1),
            "kv_copies": self.kv_copies,
            "kv_bytes_per_element": self.kv_bytes_per_element,
            "runtime_overhead_mb": round(self.runtime_overhead_bytes / MB, 1),
            "runtime_memory_mb": round(self.runtime_memory_bytes / MB, 1),
            "usable_memory_mb": round(self.usable_memory_bytes / MB, 1),
            "bytes_per_token_mb": round(self.bytes_per_token / MB, 1),
            "decode_ceiling_tok_s": round(self.decode_ceiling_tok_s, 2),
            "roofline": {"bandwidth_gb_s": self.memory_bandwidth_gb_s, "bytes_per_token": self.bytes_per_token,
                         "decode_ceiling_tok_s": round(self.decode_ceiling_tok_s, 2)},
            "feasible": self.feasible,
            "reasons": list(self.reasons),
            "fixes": list(self.fixes),
            "notes": list(self.notes),
            "host": self.host.to_dict() if self.host else None,
        }


# --- the public API ------------------------------------------------------------------------

def plan(model_source: str, recipe: Recipe, target: Target, context_tokens: int | None = None,
         vision_tower: str | None = None, host_memory_gb: float | None = None,
         output: str | Path | None = None, low_memory: bool = False) -> Plan:
    """Estimate sizes, run-time memory and the decode ceiling, and list every reason the
    combination cannot run. Reads config.json only: a folder holding just that is enough.

    context_tokens None: DEFAULT_CONTEXT_TOKENS, or, where only the KV cache keeps the plan from
    fitting, the longest context that fits if it still holds one image and a short exchange
    (image tokens + MIN_TURN_TOKENS), as one would start llama.cpp with `-c`; the plan says so in
    its notes. A context given explicitly is planned as given. `vision_tower`: the CLIP tower's folder
    for a LLaVA-Med-style checkpoint that names it in mm_vision_tower.

    The host side (`plan.host`, see host_estimate): the peak RAM and disk `compress` needs for this
    model x recipe, checked against `host_memory_gb` (None: this machine's available memory) and
    the free space where `output` (None: the current folder) will be written; a host that cannot
    compress it makes the plan infeasible too, with its own fixes. `low_memory`: compress will leave
    the weights on disk (`--low-memory`, edgemed.models.streamed); a recipe that cannot is refused."""
    from edgemed.models import adapter_for, load_config

    if low_memory and (why := streaming_refusal(recipe, target)):
        raise BadInputError(f"recipe {recipe.name}", f"cannot run with --low-memory: {why}", LOW_MEMORY_FIX)

    config = load_config(model_source, vision_tower=vision_tower)
    adapter = adapter_for(config, model_source)
    parent_params = sum(_ModelShape.from_config(adapter, config).counts.values())
    config = _apply_step_config_hooks(recipe, config)
    shape = _ModelShape.from_config(adapter, config)
    context = context_tokens or DEFAULT_CONTEXT_TOKENS
    p = _estimate(shape, recipe, target, context, model_source)
    if not p.feasible and context_tokens is None:
        fit = _max_context(shape, p)
        if fit is not None and fit < context:
            shorter = _estimate(shape, recipe, target, fit, model_source)
            if shorter.feasible:
                shorter.notes.append(f"context limited to {fit} tokens, the most that fits {target.name} "
                                     f"({context} would need {p.runtime_memory_bytes / GB:.2f} GB); "
                                     f"--context sets it")
                p = shorter
    if not p.feasible:
        p.fixes = _fixes(shape, recipe, target, p.context_tokens, p)
    from edgemed.models import normaliser_for, raw_config

    # compress streams a distillation teacher from a local Hugging Face checkpoint (pipeline._teacher)
    teacher_streams = Path(model_source).is_dir() and normaliser_for(raw_config(model_source)) is None
    host = host_estimate(shape, recipe, target, parent_params, host_memory_gb, output, low_memory=low_memory,
                         teacher_streams=teacher_streams)
    p.host = host
    if not host.feasible:
        p.feasible = False
        p.reasons += [f"host: {r}" for r in host.reasons]
        p.fixes += _host_fixes(shape, recipe, target, parent_params, host, teacher_streams)
    return p


def _max_context(shape: "_ModelShape", p: Plan) -> int | None:
    """The longest context (a multiple of 64) whose KV cache fits beside the weights, where memory is
    the only reason the plan fails and that context still holds one image and a short exchange."""
    if not all(r.startswith("needs about") for r in p.reasons) or not p.kv_cache_bytes:
        return None
    kv_per_token = p.kv_cache_bytes * p.kv_copies / p.context_tokens
    budget = (p.usable_memory_bytes - RUNTIME_OVERHEAD_FIXED_BYTES) / (1 + RUNTIME_OVERHEAD_FRACTION)
    fit = int((budget - p.artifact_bytes) // kv_per_token) // 64 * 64
    return fit if fit >= shape.image_tokens + MIN_TURN_TOKENS else None


def check_feasible(plan: Plan) -> None:
    """Raise InfeasiblePlanError naming every reason and how to fix it; return None if it runs."""
    if plan.feasible:
        return
    lines = [f"plan: {plan.model} with recipe '{plan.recipe}' on target '{plan.target}' cannot run:"]
    lines += [f"  - {r}" for r in plan.reasons]
    lines += [f"  fix: {f}" for f in plan.fixes] or ["  fix: choose another --recipe or --target (see `edgemed targets`)"]
    err = InfeasiblePlanError("\n".join(lines))
    err.reasons, err.fixes = list(plan.reasons), list(plan.fixes)
    raise err


# --- sizes ---------------------------------------------------------------------------------

class _ModelShape:
    """What the estimate needs from a config: per-component parameter counts and a few sizes."""

    _counts_cache: dict[str, tuple[dict[str, int], dict[str, int]]] = {}

    def __init__(self, family: str, counts: dict[str, int], facts, vision_hidden: int | None, tied: bool,
                 builder_decoder: bool = False, image_tokens: int = 0, linears: dict[str, int] | None = None,
                 fp16_unsafe: str | None = None):
        self.family, self.counts, self.facts = family, counts, facts
        self.linears = linears or {}  # the language model's Linear layers: qualified name -> params
        self.image_tokens = image_tokens
        self.vision_hidden, self.tied = vision_hidden, tied
        # onnx-export's decoder=auto uses onnxruntime-genai's builder here (see genai_decoder)
        self.builder_decoder = builder_decoder
        self.fp16_unsafe = fp16_unsafe  # why the family's activations leave fp16's range, if they do

    @classmethod
    def from_config(cls, adapter, config) -> "_ModelShape":
        import importlib.util

        from edgemed.models import decoder_facts, param_counts
        from edgemed.models.base import text_facts

        # Building the meta model takes a second or two for a 7B; `plan` is called repeatedly
        # (hints, the CLI, compress), so cache by the config's full JSON.
        key = config.to_json_string()
        if key not in cls._counts_cache:
            cls._counts_cache[key] = param_counts(config)
        counts, linears = cls._counts_cache[key]
        vc = getattr(config, "vision_config", None)
        tc = adapter.text_config(config)
        tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
        facts = decoder_facts(tc.model_type)
        builder = (not adapter.decoder_token_type_ids and facts is not None and facts.builder_arch is not None
                   and importlib.util.find_spec("onnxruntime_genai") is not None)
        return cls(adapter.family, counts, text_facts(adapter, config),
                   getattr(vc, "hidden_size", None) if vc is not None else None, tied, builder,
                   (adapter.num_image_tokens(config) or 0) if vc is not None else 0, linears, adapter.fp16_unsafe)

    def language_share(self, patterns: list[str]) -> float:
        """The fraction of the language model's parameters in Linear layers whose name contains one
        of `patterns` (onnx-quantize's int8_projections match node names the same way)."""
        total = self.counts.get("language", 0)
        hit = sum(p for name, p in self.linears.items() if any(s in name for s in patterns))
        return min(hit / total, 1.0) if total else 0.0


def _apply_step_config_hooks(recipe: Recipe, config):
    """A model-stage step that changes shapes (pruning, MoE) may define `plan_config(config) ->
    config` so the plan counts the transformed model; steps without it leave the config as is."""
    from edgemed.steps import STEPS

    for s in recipe.steps:
        cls = STEPS.get(s.step)
        if hasattr(cls, "plan_config"):
            config = s.build().plan_config(config)
    return config


def _estimate(shape: _ModelShape, recipe: Recipe, target: Target, context_tokens: int, source: str) -> Plan:
    if context_tokens < 1:
        raise InfeasiblePlanError(f"context_tokens must be >= 1, got {context_tokens}")
    backend = backend_for(recipe, target, shape)
    fmt = recipe.format
    policy = recipe.policy
    facts = shape.facts
    activations = backend.activations
    order = [c for c in COMPONENTS if c in shape.counts] + [c for c in shape.counts if c not in COMPONENTS]

    comps: dict[str, ComponentEstimate] = {}
    for name in order:
        params = shape.counts[name]
        prec = getattr(policy, name, "fp32")  # a component the policy does not name (a router) stays fp32
        if name == "embed" and shape.tied and backend.tied_lm_head_stored_once():
            # one table serves both: it is stored at the higher of the two (gguf-quantize's tied_precision)
            prec = max((prec, policy.lm_head), key=lambda q: PRECISION_BITS[q])
        if activations == "fp16" and prec == "fp32":
            prec = "fp16"  # onnx-quantize stores every float tensor fp16 there
        in_features = shape.vision_hidden if (name == "vision" and shape.vision_hidden) else facts.hidden_size
        bits = backend.bits_per_weight(prec, in_features)
        note = ""
        mixture = backend.language_bits(prec, shape) if name == "language" else None
        if mixture:
            bits, note = mixture
        keep8 = backend.int8_projections() if name == "language" and prec == "int4" else []
        share = shape.language_share(keep8) if keep8 else 0.0
        if share:
            bits8 = backend.bits_per_weight("int8", in_features)
            bits = share * bits8 + (1 - share) * bits
            note = f"{share:.0%} of it int8 ({', '.join(keep8)})"
        nbytes = math.ceil(params * bits / 8)
        if name == "lm_head" and shape.tied and backend.tied_lm_head_stored_once():
            nbytes, note = 0, "tied: stored once as the embedding table"
        comps[name] = ComponentEstimate(params=params, precision=prec, bits_per_weight=bits, bytes=nbytes,
                                        read_per_token=name in ("language", "lm_head"), note=note)

    artifact = sum(c.bytes for c in comps.values())
    kv_elem = backend.kv_bytes_per_element()
    kv = 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim * context_tokens * kv_elem
    kv_copies = backend.kv_copies()
    overhead = math.ceil((artifact + kv * kv_copies) * RUNTIME_OVERHEAD_FRACTION) + RUNTIME_OVERHEAD_FIXED_BYTES
    runtime = artifact + kv * kv_copies + overhead

    # Per decoded token the decoder streams every language and lm_head weight once and reads the
    # whole KV cache (the worst case, at the end of the context); one embedding row is looked up.
    # The vision tower and projector run once per image, not per token.
    embed_row = math.ceil(comps["embed"].bytes / max(facts.vocab_size, 1)) if "embed" in comps else 0
    per_token = sum(c.bytes for c in comps.values() if c.read_per_token) + embed_row + kv
    if "lm_head" in comps and comps["lm_head"].bytes == 0 and "embed" in comps:
        per_token += comps["embed"].bytes
    ceiling = target.memory_bandwidth_gb_s * GB / per_token

    usable = int(target.usable_memory_gb * GB)
    reasons = []
    if fmt is not None and fmt not in target.formats:
        reasons.append(f"format '{fmt}' does not run on {target.name} (it runs: {', '.join(target.formats)})")
    for name, c in comps.items():
        if c.params == 0:
            continue
        if c.precision not in target.precisions and c.precision not in ALWAYS_RUNNABLE:
            reasons.append(f"{name} at {c.precision}: {target.name} does not support {c.precision}"
                           f" (it runs: {', '.join(target.precisions)})")
        allowed = backend.storable(name) if fmt else None
        if allowed is not None and c.precision not in allowed:
            reasons.append(f"{name} at {c.precision}: the {fmt} format cannot store {name} at {c.precision}"
                           f" (use one of: {', '.join(sorted(allowed))})")
    if runtime > usable:
        reasons.append(
            f"needs about {runtime / GB:.2f} GB at run time (weights {artifact / GB:.2f} GB + KV cache "
            f"{kv / GB:.2f} GB at {context_tokens} tokens{' x 2: past and present' if kv_copies == 2 else ''} + "
            f"overhead {overhead / GB:.2f} GB), but {target.name} "
            f"leaves {target.usable_memory_gb:g} GB for a model"
        )
    reasons += backend.build_reasons(comps, usable)
    reasons += backend.model_reasons()
    return Plan(
        model=source, family=shape.family, recipe=recipe.name, target=target.name, format=fmt,
        context_tokens=context_tokens, components=comps, artifact_bytes=artifact, kv_cache_bytes=kv, kv_copies=kv_copies,
        kv_bytes_per_element=kv_elem, runtime_overhead_bytes=overhead, runtime_memory_bytes=runtime,
        usable_memory_bytes=usable, bytes_per_token=per_token, memory_bandwidth_gb_s=target.memory_bandwidth_gb_s,
        decode_ceiling_tok_s=ceiling, feasible=not reasons, reasons=reasons,
    )


# --- the host that compresses ---------------------------------------------------------------

def host_estimate(shape: _ModelShape, recipe: Recipe, target: Target, parent_params: int,
                  host_memory_gb: float | None = None, output: str | Path | None = None,
                  low_memory: bool = False, teacher_streams: bool = False) -> HostEstimate:
    """Peak RAM and disk of `edgemed compress` for this model x recipe:

        peak = process + parent in fp32 (compress loads it so and keeps it throughout)
               + the distillation teacher where the recipe distills (streamed from a local
                 checkpoint, else a copy), + what a step holds of its own
                 (Step.host_bytes: distill's gradients and AdamW moments)
               + the format's export/quantize transient (FormatBackend.host_transient x the parent's
                 fp32 bytes + host_transient_fixed: graphs, sessions, calibration tensors)
        disk = the artifact + scratch (FormatBackend.host_scratch x the fp32 bytes)

    The factors are fitted to peak RSS measured by bench/bench_memory.py (its results.md compares
    each prediction with the measurement).

    With `low_memory` the parent stays on disk: its part is HOST_STREAM_FACTOR x the largest
    tensor in fp32 (read, converted, written one at a time), the export's transient does not
    grow with the model (the GGUF writer and llama.cpp's quantizer hold one tensor) but for what a
    step holds of its own (GPTQ: one layer's Hessians), and parity's session holds what
    FormatBackend.low_memory_parity_bytes says (GGUF: the artifact, mapped: page cache, not a need,
    reported as mapped_bytes; ONNX: one decoder layer at a time)."""
    backend = backend_for(recipe, target, shape)
    fp32 = 4 * parent_params  # the model as given, before a recipe's pruning
    if low_memory:
        largest = _largest_tensor_bytes(shape)
        at_parity = _estimate(shape, recipe, target, LOW_MEMORY_PARITY_CONTEXT, "")
        artifact = at_parity.artifact_bytes
        # The parity check runs the artifact (what its session holds of it, with an f32 KV cache of
        # LOW_MEMORY_PARITY_CONTEXT tokens) after the parent's side is computed
        # (reference.parity.parent_parity_refs): the larger of the two is resident, not both.
        kv_f32 = at_parity.kv_cache_bytes * 4 // max(1, at_parity.kv_bytes_per_element)
        held = backend.low_memory_parity_bytes(at_parity, shape.facts.num_layers)
        mapped = backend.low_memory_parity_mapped(at_parity)
        # What a step holds (GPTQ's Hessians) is resident with the streamed weights, not in parity.
        streamed = (backend.low_memory_stream_factor or HOST_STREAM_FACTOR) * largest + \
            sum(_step_parts(recipe, shape, low_memory=True).values())
        parts = {"process": HOST_PROCESS_BYTES, f"{recipe.format} export and quantize": int(backend.host_transient_fixed),
                 STREAM_PART: int(max(streamed, held + kv_f32))}
        return _host_check(parts, int(artifact + backend.host_scratch * fp32), host_memory_gb, output, low_memory=True,
                           mapped=mapped)
    parts = {"process": HOST_PROCESS_BYTES, "parent (fp32)": fp32}
    if any(s.step == "distill" for s in recipe.steps):
        if teacher_streams:  # pipeline._teacher: read from the checkpoint while it runs
            parts["teacher (distill, streamed from disk)"] = int(HOST_STREAM_FACTOR * _largest_tensor_bytes(shape))
        else:
            parts["teacher copy (distill)"] = fp32
    parts.update(_step_parts(recipe, shape))
    if recipe.format is not None:
        parts[f"{recipe.format} export and quantize"] = int(backend.host_transient * fp32 + backend.host_transient_fixed)
    return _host_check(parts, int(_artifact_bytes(shape, recipe, target) + backend.host_scratch * fp32),
                       host_memory_gb, output)


def _step_parts(recipe: Recipe, shape: _ModelShape, low_memory: bool = False) -> dict[str, int]:
    """What steps hold of their own (Step.host_bytes: distill's optimizer, GPTQ's Hessians)."""
    from edgemed.steps import STEPS

    held = {f"{s.step} step": int(s.build().host_bytes(shape, low_memory=low_memory)) for s in recipe.steps
            if hasattr(STEPS.get(s.step), "host_bytes")}
    return {k: v for k, v in held.items() if v > 0}


def _largest_tensor_bytes(shape: _ModelShape) -> int:
    return 4 * max([shape.counts.get("embed", 0), shape.counts.get("lm_head", 0), *shape.linears.values()])


def _artifact_bytes(shape: _ModelShape, recipe: Recipe, target: Target) -> int:
    return _estimate(shape, recipe, target, DEFAULT_CONTEXT_TOKENS, "").artifact_bytes if recipe.format else 0


def _host_fixes(shape: _ModelShape, recipe: Recipe, target: Target, parent_params: int,
                host: HostEstimate, teacher_streams: bool = False) -> list[str]:
    fixes = []
    fits = []
    for r in _shipped("recipes"):
        if r.name == recipe.name or r.format is None:
            continue
        alt = host_estimate(shape, r, target, parent_params, host.memory_bytes / GB,
                            low_memory=streaming_refusal(r, target) is None, teacher_streams=teacher_streams)
        if alt.peak_ram_bytes <= host.memory_bytes * (1 - HOST_MARGIN_FRACTION) and \
                _estimate(shape, r, target, DEFAULT_CONTEXT_TOKENS, "").feasible:
            flag = " --low-memory" if streaming_refusal(r, target) is None else ""
            fits.append((alt.peak_ram_bytes, f"--recipe {r.name}{flag} ({alt.peak_ram_bytes / GB:.1f} GB)"))
    if streaming_refusal(recipe, target) is None and "parent (fp32)" in host.parts:
        low = host_estimate(shape, recipe, target, parent_params, host.memory_bytes / GB, low_memory=True)
        if low.peak_ram_bytes <= host.memory_bytes * (1 - HOST_MARGIN_FRACTION):
            fixes.append(f"--low-memory: the weights stay on disk, read one tensor at a time "
                         f"(about {low.peak_ram_bytes / GB:.1f} GB)")
    if fits:
        fixes.append(f"a recipe this host can compress for {target.name}: " + ", ".join(s for _, s in sorted(fits)[:4]))
    need = host.peak_ram_bytes / (1 - HOST_MARGIN_FRACTION) / GB
    fixes.append(f"compress on a machine with at least {math.ceil(need)} GB of free RAM "
                 f"(`edgemed plan --host-memory-gb N` checks another machine's size)")
    return fixes


# --- fix hints: computed, never guessed -----------------------------------------------------

def _shipped(kind: str) -> list:
    """Every shipped recipe or target that loads; a broken file must not break a hint."""
    from edgemed._resources import shipped_names
    from edgemed.recipe import load_recipe
    from edgemed.target import load_target

    load = load_recipe if kind == "recipes" else load_target
    out = []
    for name in shipped_names(kind):
        try:
            out.append(load(name))
        except (EdgemedError, ValueError, ImportError):
            continue
    return out


def _fixes(shape: _ModelShape, recipe: Recipe, target: Target, context: int, p: Plan) -> list[str]:
    fixes: list[str] = []

    # Other shipped recipes that would run on this target (same checks, same context).
    fits = []
    for r in _shipped("recipes"):
        if r.name == recipe.name:
            continue
        alt = _estimate(shape, r, target, context, p.model)
        if alt.feasible:
            fits.append((alt.runtime_memory_bytes, f"--recipe {r.name} ({alt.runtime_memory_bytes / GB:.1f} GB)"))
    if fits:
        fixes.append(f"a recipe that fits {target.name}: " + ", ".join(s for _, s in sorted(fits)[:4]))

    # A shorter context, if the weights fit and only the KV cache does not, and what is left still
    # holds one image and a short exchange (MIN_TURN_TOKENS).
    max_ctx = _max_context(shape, p)
    if max_ctx is not None and max_ctx < context:
        fixes.append(f"a context of at most {max_ctx} tokens (--context {max_ctx}; this plan assumed {context})")

    # Bigger or more capable shipped targets for this recipe, smallest first.
    targets = []
    for t in _shipped("targets"):
        if t.name == target.name:
            continue
        alt = _estimate(shape, recipe, t, context, p.model)
        if alt.feasible:
            targets.append((t.usable_memory_gb, t.name))
    if targets:
        fixes.append("a target that runs this recipe: " + ", ".join(n for _, n in sorted(targets)[:4]))
    return fixes
