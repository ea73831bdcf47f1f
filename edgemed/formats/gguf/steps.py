"""GGUF export and quantization steps (llama.cpp: one language-model GGUF + one mmproj GGUF).

Quantization goes through llama.cpp's own `llama_model_quantize` (llama-cpp-python), so the
quantization mixtures (`q4_k_m` = Q4_K with Q6_K where llama.cpp puts it), the K-quant shape
fallbacks and the imatrix handling are llama.cpp's. The component policy is compiled to its
parameters: `language` -> the file type, `embed` -> token_embedding_type, `lm_head` ->
output_tensor_type, and the recipe's `tensor_types` -> per-tensor overrides (llama-quantize's
`--tensor-type`). The mmproj is written at the vision precision by the export step (llama.cpp's
quantizer does not take clip files) and its projector stays F16.
"""
from __future__ import annotations

import ctypes
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from edgemed.errors import BadInputError, EdgemedError, MissingDependencyError
from edgemed.formats.gguf import gguf_type_name
from edgemed.steps import Step, StepArgs

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.context import Context

log = logging.getLogger(__name__)
LANGUAGE_COMPONENT = "embed+language+lm_head"
VISION_COMPONENT = "vision+projector"
# Types llama.cpp refuses to produce without an imatrix (llama-quant.cpp tensor_requires_imatrix).
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s")


class GgufExportArgs(StepArgs):
    # The language-model file gguf-quantize starts from; f32 keeps the quantizer's input exact.
    dtype: Literal["f32", "f16"] = "f32"


class GgufExport(Step):
    name = "gguf-export"
    stage = "export"
    formats = ("gguf",)
    streams = True
    summary = "language model -> model-*.gguf (tokenizer, chat template) + vision tower/projector -> mmproj-*.gguf"
    Args = GgufExportArgs

    def run(self, ctx: "Context") -> None:
        from edgemed.formats.gguf.export import export_gguf
        from edgemed.formats.gguf.mmproj import has_cls_token

        policy = ctx.recipe.policy
        lang = gguf_type_name(policy.language)
        base = lang if lang in ("f32", "f16") else self.args.dtype
        vision = gguf_type_name(policy.vision)
        projector = gguf_type_name(policy.projector)
        if projector not in ("f32", "f16"):
            ctx.notes.append(f"gguf-export: projector policy {policy.projector} stored as F16 "
                             "(clip crashed on a Q8_0 projector; REFERENCE.md)")
        for rec in export_gguf(ctx.cm, ctx.work_dir, precision=base, vision_precision=vision,
                               projector_precision=projector, progress=ctx.progress):
            ctx.describe(rec["path"], component=rec["component"], fmt="gguf", precision=rec["precision"])
        cm = ctx.cm
        mmproj = cm.adapter.mmproj if cm.multimodal else None
        if mmproj is not None and mmproj.projector_type == "mlp" and has_cls_token(cm):
            ctx.notes.append("mmproj: this CLIP tower has a CLS token, which llama.cpp's clip code mis-orders "
                             "(upstream ggml-org/llama.cpp#25814): llama.cpp's image embeddings for it are wrong "
                             "upstream; see parity.vision_upstream_issue")
        if mmproj is not None and mmproj.single_tokens:
            missing = [t for t in mmproj.single_tokens
                       if len(cm.tokenizer(t, add_special_tokens=False).input_ids) != 1]
            if missing:
                ctx.notes.append(f"mmproj: llama.cpp's own mtmd prompt for {mmproj.projector_type} needs "
                                 f"{', '.join(repr(t) for t in missing)} as single tokens and this tokenizer splits "
                                 "them, so llama-mtmd-cli would feed token -1; edgemed's GGUF runtime builds the "
                                 "prompt itself and is not affected")


class GgufQuantizeArgs(StepArgs):
    # Importance matrix: computed in PyTorch from the whole VLM on images + prompts (multimodal),
    # from prompts alone (text), or not at all.
    imatrix: Literal["multimodal", "text", "none"] = "none"
    calibration_count: int = Field(16, ge=1, le=4096)
    # Extra per-tensor overrides, llama-quantize --tensor-type style: regex on the GGUF name -> precision.
    tensor_types: dict[str, str] = Field(default_factory=dict)
    nthread: int = Field(0, ge=0)  # 0 = llama.cpp's choice
    keep_unquantized: bool = False


class GgufQuantize(Step):
    name = "gguf-quantize"
    stage = "artifact"
    formats = ("gguf",)
    streams = True
    summary = "llama.cpp's llama_model_quantize per the component policy (q8_0 ... iq4_xs), optional medical imatrix"
    Args = GgufQuantizeArgs

    def run(self, ctx: "Context") -> None:
        policy = ctx.recipe.policy
        lang = gguf_type_name(policy.language)
        src = _language_file(ctx)
        _llama_cpp()  # before any imatrix pass: a missing runtime should cost seconds, not minutes
        if lang in ("f32", "f16") and not self.args.tensor_types:
            ctx.notes.append(f"gguf-quantize: language policy {lang}: nothing to quantize")
            return
        if lang in NEEDS_IMATRIX and self.args.imatrix == "none":
            raise BadInputError(f"recipe {ctx.recipe.name}: policy.language {lang}",
                                "llama.cpp cannot quantize to this type without an importance matrix",
                                "set gguf-quantize's imatrix: multimodal (or text)")
        imatrix_path = None
        if self.args.imatrix != "none":
            imatrix_path = self._imatrix(ctx)
        dst = ctx.work_dir / f"model-{lang}.gguf"
        ctx.progress(f"llama_model_quantize {src.name} -> {dst.name}")
        tied = quantize_gguf(src, dst, policy, tensor_types=self.args.tensor_types, imatrix=imatrix_path,
                             nthread=self.args.nthread)
        if not self.args.keep_unquantized and src != dst:
            src.unlink()
            ctx.files.pop(src.name, None)
        summary = tensor_type_summary(dst, lang)
        ctx.describe(dst.name, component=LANGUAGE_COMPONENT, fmt="gguf", precision=lang)
        ctx.notes.append(f"gguf-quantize: {dst.name}: tensor types {summary['types']}")
        if summary["fallbacks"]:
            ctx.notes.append(f"gguf-quantize: K-quant fallback (row length not a multiple of 256): "
                             f"{summary['fallback_count']} of {summary['quantized']} quantized tensors "
                             f"stored as {summary['fallbacks']}")
        if tied:
            ctx.notes.append(f"gguf-quantize: lm_head is tied to the embeddings; token_embd.weight serves both at "
                             f"{tied_precision(policy)} (the higher of policy embed {policy.embed} and lm_head {policy.lm_head})")

    def _imatrix(self, ctx: "Context") -> Path:
        from edgemed.calibration.samples import calibration_set
        from edgemed.formats.gguf.imatrix import compute_imatrix, write_imatrix_gguf

        calib = calibration_set(ctx.cm, ctx.recipe.calibration, self.args.imatrix, self.args.calibration_count)
        ctx.progress(f"imatrix: {len(calib.samples)} {calib.modality} passes through the parent")
        stats = compute_imatrix(ctx.cm, calib, progress=ctx.progress)
        path = ctx.work_dir / "imatrix.gguf"
        write_imatrix_gguf(path, stats, [calib.source])
        ctx.describe(path.name, component="imatrix", fmt="gguf-imatrix", precision="f32")
        rec = calib.record()
        ctx.notes.append(f"imatrix: {rec['modalities']} from {rec['source']} ({rec['count']} passes, "
                         f"{stats.tokens} tokens, sha256 {rec['sha256'][:16]}); image-token positions included"
                         if rec["modalities"] == "multimodal" else
                         f"imatrix: text from {rec['source']} ({rec['count']} passes, {stats.tokens} tokens)")
        ctx.calibration = rec  # the manifest's `calibration` field
        return path


def _language_file(ctx: "Context") -> Path:
    files = [p for p in sorted(ctx.work_dir.glob("model-*.gguf"))]
    if len(files) != 1:
        raise BadInputError(f"recipe {ctx.recipe.name}", "gguf-quantize needs exactly one model-*.gguf from gguf-export",
                            "put gguf-export before gguf-quantize in the recipe")
    return files[0]


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError("GGUF quantization", "llama-cpp-python", "llamacpp") from None
    return llama_cpp


def quantize_gguf(src: Path, dst: Path, policy, tensor_types: dict[str, str] | None = None,
                  imatrix: Path | None = None, nthread: int = 0) -> bool:
    """llama_model_quantize(src -> dst) with the policy compiled to its parameters.
    Returns whether the model ties lm_head to the embeddings (no output.weight)."""
    import gguf

    from edgemed.formats.gguf.writer import ggml_type, llama_ftype
    from edgemed.formats.gguf.imatrix import read_imatrix

    lc = _llama_cpp()
    from llama_cpp import _logger

    # llama.cpp prints one line per tensor; keep that for debugging only (the summary goes to the notes).
    _logger.set_verbose(log.isEnabledFor(logging.DEBUG))
    reader = gguf.GGUFReader(src)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    del reader
    params = lc.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = int(llama_ftype(policy.language))
    # embed / lm_head go in as per-tensor overrides rather than token_embedding_type /
    # output_tensor_type: llama.cpp applies its K-quant shape fallback on the override path only
    # (an explicit Q4_K token_embd with 576 columns aborts with "invalid size").
    overrides = dict(tensor_types or {})  # the recipe's own patterns win (first match applies)
    if tied:
        # One tensor serves as embeddings and lm_head: give it the higher of the two precisions,
        # since the lm_head's error reaches every logit (llama.cpp's own mixtures do the same).
        overrides.setdefault(r"^token_embd\.weight$", tied_precision(policy))
    else:
        overrides.setdefault(r"^token_embd\.weight$", policy.embed)
        overrides.setdefault(r"^output\.weight$", policy.lm_head)
    keep = []  # ctypes buffers must outlive the call
    arr = (lc.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, prec) in enumerate(overrides.items()):
        b = pattern.encode()
        keep.append(b)
        arr[i].pattern = b
        arr[i].type = int(ggml_type(prec))
    arr[len(overrides)].pattern = None
    params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(lc.llama_model_tensor_override))
    keep.append(arr)
    if imatrix is not None:
        values = read_imatrix(imatrix)
        arr = (lc.llama_model_imatrix_data * (len(values) + 1))()
        for i, (name, v) in enumerate(sorted(values.items())):
            buf = (ctypes.c_float * len(v))(*v.astype("float32").tolist())
            b = name.encode()
            keep += [buf, b]
            arr[i].name = b
            arr[i].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
            arr[i].size = len(v)
        arr[len(values)].name = None
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(lc.llama_model_imatrix_data))
        keep.append(arr)
    tmp = dst.with_name(dst.name + ".partial")
    rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise EdgemedError(f"llama_model_quantize({src.name} -> {gguf_type_name(policy.language)}) failed (rc={rc}); "
                           "llama.cpp's log above says why")
    tmp.replace(dst)
    return tied


def tied_precision(policy) -> str:
    from edgemed.recipe import PRECISION_BITS

    return max((policy.embed, policy.lm_head), key=lambda p: PRECISION_BITS[p])


def tensor_type_summary(path: Path, precision: str) -> dict:
    """Tensor types actually stored, and which quantized tensors fell back from the K-quant
    (llama.cpp demotes a 256-block type when a row length is not a multiple of 256)."""
    import gguf

    from edgemed.formats.gguf.writer import ggml_type

    T = gguf.GGMLQuantizationType
    r = gguf.GGUFReader(path)
    types = Counter(t.tensor_type.name for t in r.tensors)
    target = ggml_type(precision)
    block = gguf.GGML_QUANT_SIZES[target][0]
    quantized = [t for t in r.tensors if t.tensor_type not in (T.F32,) and len(t.shape) >= 2]
    fallbacks = Counter()
    if block == 256:
        for t in quantized:
            if int(t.shape[0]) % 256 != 0 and gguf.GGML_QUANT_SIZES[t.tensor_type][0] != 256:
                fallbacks[t.tensor_type.name] += 1
    return {"types": dict(types), "quantized": len(quantized), "fallbacks": dict(fallbacks),
            "fallback_count": sum(fallbacks.values())}
