"""TensorRT target: TensorRT-ready Q/DQ ONNX plus build profiles; engines are built on the device.

TensorRT engines are specific to the GPU and the TensorRT version, so the host writes everything up
to the engine (as TensorRT Edge-LLM does) and `edgemed build-engine` finishes on the device:

    vision_encoder.onnx / embed_tokens.onnx / decoder_model_merged.onnx   torch.onnx graphs (the
        genai builder's GroupQueryAttention and MatMulNBits are ONNX Runtime contrib ops that
        TensorRT's parser rejects), quantized per the component policy in explicit Q/DQ form:
          int8  QuantizeLinear/DequantizeLinear on activations and weights (quantize_static, QDQ,
                symmetric, per-channel weights, no bias quantization, MatMul/Conv/Gemm with constant
                weights only, calibrated on a small deterministic image+prompt set)
          fp8   the same with FLOAT8E4M3FN (per-tensor scales; Ada, Hopper, Thor)
          int4  weight-only DequantizeLinear blocks (INT4 initializers, block_size along K), which
                TensorRT 10 reads as INT4 weight-only (W4A16)
          fp16  ONNX Runtime's float16 converter (inputs and outputs stay fp32)
    trt_profiles.json   min/opt/max shapes per graph input, precision flags and workspace bytes
                        (also in manifest.json under runtime.trt)

Why symmetric MatMul/Conv/Gemm-only Q/DQ: TensorRT fuses Q/DQ into its int8 kernels only for
symmetric scales without zero points, and a Hugging Face decoder's attention-mask `Add` (a large
negative bias) must stay out of Q/DQ or calibration returns inf scales.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from edgemed.errors import BadInputError, EdgemedError
from edgemed.steps.base import Step, StepArgs
from edgemed.steps.onnx_steps import _fold_weight_transposes, _fp16, _graph_component, _save, replace_nodes

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.pipeline import Context

log = logging.getLogger(__name__)

PROFILES_FILE = "trt_profiles.json"
QDQ_PRECISIONS = ("int8", "fp8", "int4")
FLOAT_PRECISIONS = ("fp32", "fp16")
# TensorRT builder flag per precision (trt.BuilderFlag member names).
BUILDER_FLAGS = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8", "fp8": "FP8", "int4": "INT4", "fp4": "FP4"}
CALIBRATION_PROMPTS = (
    "Is there a pleural effusion on this chest radiograph?",
    "Describe the cardiac silhouette.",
    "Is the endotracheal tube in a correct position?",
    "What abnormality is seen in the right upper lobe?",
    "Are there signs of pneumothorax?",
    "Summarize the findings of this image.",
)


class TrtExportArgs(StepArgs):
    # 21: the first opset with INT4 and blocked DequantizeLinear (int4 needs it; fp8 needs >= 19).
    opset: int = Field(21, ge=19, le=23)
    calibration_samples: int = Field(8, ge=1, le=512)
    int4_block_size: int = 128
    # rtn: round-to-nearest blocks (max |w| / 7). awq_clip: AWQ's clip search, activation-aware:
    # per block, the clip ratio that minimizes the output error weighted by the calibration
    # activations' per-channel second moments (no per-channel pre-scaling, so no extra graph op).
    int4_algorithm: Literal["rtn", "awq_clip"] = "awq_clip"
    # Shapes the engines are built for (TensorRT fixes the ranges at build time).
    max_context: int = Field(2048, ge=16)
    max_images: int = Field(1, ge=1, le=64)
    # Layers outside Q/DQ (norms, softmax, attention) may run in fp16 on the device.
    fp16_fallback: bool = True
    # Builder workspace as a share of the target's usable memory, capped.
    workspace_fraction: float = Field(0.25, gt=0, le=0.9)
    max_workspace_gb: float = Field(4.0, gt=0)

    @field_validator("int4_block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError("int4_block_size must be a power of two >= 16")
        return v


class TensorrtExport(Step):
    name = "tensorrt-export"
    stage = "export"
    formats = ("tensorrt",)
    summary = "Q/DQ ONNX (int8/fp8/int4 weight-only/fp16 per component) + TensorRT build profiles; engines built on the device"
    Args = TrtExportArgs

    def run(self, ctx: "Context") -> None:
        from edgemed.export.onnx import export_onnx

        policy = ctx.recipe.policy
        if policy.embed not in ("fp32", "fp16"):
            raise BadInputError(f"recipe {ctx.recipe.name}: policy.embed", f"'{policy.embed}' is not supported "
                                "for the embedding table (a Gather, not a MatMul)", "use fp32 or fp16 for embed")
        ctx.runtime["decoder_builder"] = "torch"
        ctx.runtime["kv_cache"] = "concat"
        ctx.notes.append("decoder graph written by torch.onnx (dynamo): TensorRT cannot parse the genai builder's contrib ops")
        names, _, note = export_onnx(ctx.cm, ctx.work_dir, opset=self.args.opset, progress=ctx.progress,
                                     decoder_builder="torch")
        ctx.notes.append(note)
        samples = None
        calibrated = ("int8", "fp8", "int4") if self.args.int4_algorithm == "awq_clip" else ("int8", "fp8")
        if any(getattr(policy, c) in calibrated for c in ("vision", "projector", "language", "lm_head")):
            ctx.progress("calibration feeds")
            samples, ctx.calibration = calibration_feeds(ctx, self.args.calibration_samples)
        for name in names:
            ctx.progress(f"Q/DQ {name}")
            precisions = qdq_graph(ctx.work_dir / name, policy, self.args, samples.get(name) if samples else None)
            ctx.describe(name, component=_graph_component(name), fmt="onnx",
                         precision="+".join(sorted(set(precisions.values()))) or "fp32")
        profiles = build_profiles(ctx.work_dir, ctx.cm.text.to_dict(), ctx.cm.image.to_dict() if ctx.cm.image else None,
                                  {n: qdq_precisions(ctx.work_dir / n, policy) for n in names}, self.args,
                                  usable_memory_gb=ctx.target.usable_memory_gb)
        if (ctx.runtime.get("sparsity") or {}).get("pattern") == "2:4":
            # 2:4 weights (prune-sparse): let TensorRT pick its sparse tensor-core kernels (Ampere+).
            for name, entry in profiles["graphs"].items():
                if name == "decoder_model_merged.onnx":
                    entry["precision_flags"] = sorted({*entry["precision_flags"], "SPARSE_WEIGHTS"})
        problems = validate_profiles(profiles, ctx.work_dir)
        if problems:
            raise EdgemedError("tensorrt-export wrote invalid build profiles: " + "; ".join(problems))
        (ctx.work_dir / PROFILES_FILE).write_text(json.dumps(profiles, indent=2))
        ctx.describe(PROFILES_FILE, component="trt-profiles", fmt="json", precision=None)
        ctx.runtime["trt"] = {"profiles_file": PROFILES_FILE, **profiles, "engines": None, "build": None}


# --- calibration ---------------------------------------------------------------------------------

def calibration_feeds(ctx: "Context", count: int, samples: list[tuple[Any, str]] | None = None,
                      source: str | None = None) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Real inputs for each graph. `samples` is [(PIL image or None, prompt)], e.g. from a
    calibration set; by default a small deterministic set: synthetic radiographs
    (edgemed.parity.synthetic_test_image, one seed per sample) and built-in prompts, half with the
    image. The fp32 graphs just written produce the decoder's inputs_embeds, so the decoder is
    calibrated on exactly what it will see (prefill with an empty past)."""
    import numpy as np

    from edgemed.parity import synthetic_test_image
    from edgemed.runtime.onnx_session import OnnxSession

    cm = ctx.cm
    ctx.cm.tokenizer.save_pretrained(ctx.work_dir)  # the session needs tokenizer.json; compress writes it again
    manifest = {"model": {"text": cm.text.to_dict(), "image": cm.image.to_dict() if cm.image else None,
                          "chat_template": cm.chat_template}, "runtime": {"kv_cache": "concat"}}
    session = OnnxSession(ctx.work_dir, manifest)
    dec_inputs = {i.name for i in session.decoder.get_inputs()}
    feeds: dict[str, list[dict]] = {"vision_encoder.onnx": [], "embed_tokens.onnx": [], "decoder_model_merged.onnx": []}
    listing = []
    if samples is None:
        samples = [(synthetic_test_image(size=max(96, cm.image.image_size), seed=i) if cm.multimodal and i % 2 == 0
                    else None, CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)]) for i in range(count)]
        names = [f"synthetic_test_image(seed={i})" if img is not None else "text" for i, (img, _) in enumerate(samples)]
    else:
        names = [f"image[{i}]" if img is not None else "text" for i, (img, _) in enumerate(samples)]
    for i, (image, prompt) in enumerate(samples):
        with_image = cm.multimodal and image is not None
        feats = None
        if with_image:
            pv = session.pixel_values(image)
            feeds["vision_encoder.onnx"].append({"pixel_values": pv})
            feats = session.encode_image(pv)
        ids = session.prompt_ids(prompt, with_image)
        feeds["embed_tokens.onnx"].append({"input_ids": ids[None]})
        embeds = session.input_embeds(ids, feats)
        s = len(ids)
        dec = {"inputs_embeds": embeds, "attention_mask": np.ones((1, s), np.int64),
               "position_ids": np.arange(s, dtype=np.int64)[None]}
        if "token_type_ids" in dec_inputs:
            dec["token_type_ids"] = (ids == cm.image.image_token_id).astype(np.int64)[None] if cm.image else np.zeros((1, s), np.int64)
        dec.update(session.empty_past().arrays)
        feeds["decoder_model_merged.onnx"].append(dec)
        listing.append(f"{names[i] if with_image else 'text'}|{prompt}")
    del session
    record = {"source": source or "edgemed built-in: synthetic radiographs (edgemed.parity.synthetic_test_image) + prompts",
              "count": len(samples), "modalities": ["image", "text"] if cm.multimodal else ["text"],
              "sha256": hashlib.sha256("\n".join(listing).encode()).hexdigest(), "used_by": "tensorrt-export (int8/fp8 activation scales)"}
    return feeds, record


class _Reader:
    """onnxruntime CalibrationDataReader over precomputed feeds, restricted to the graph's inputs."""

    def __init__(self, feeds: list[dict], input_names: set[str]):
        self._it = iter([{k: v for k, v in f.items() if k in input_names} for f in feeds])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - ORT calls it only for some calibrators
        pass


# --- Q/DQ per component ----------------------------------------------------------------------------

def _weight_nodes(model) -> dict[str, list[str]]:
    """{component: [node names]} of MatMul/Gemm/Conv nodes whose weight is an initializer."""
    from edgemed.export.onnx import node_components

    comps = node_components(model)
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1 and n.input[1] in inits and n.name in comps:
            out.setdefault(comps[n.name], []).append(n.name)
    return out


def qdq_precisions(path: Path, policy) -> dict[str, str]:
    """{component: precision} for the components present in one graph."""
    import onnx

    from edgemed.export.onnx import node_components

    model = onnx.load(str(path), load_external_data=False)
    return {c: getattr(policy, c) for c in set(node_components(model).values()) if hasattr(policy, c)}


def qdq_graph(path: Path, policy, args: TrtExportArgs, feeds: list[dict] | None) -> dict[str, str]:
    """Quantize one graph in place into explicit Q/DQ form. Returns {component: precision}."""
    import onnx

    from edgemed.export.onnx import node_components

    model = onnx.load(str(path))
    _fold_weight_transposes(model)
    comps = node_components(model)
    wanted = {c: getattr(policy, c) for c in set(comps.values()) if hasattr(policy, c)}
    for comp, prec in wanted.items():
        if prec not in QDQ_PRECISIONS + FLOAT_PRECISIONS:
            raise BadInputError(f"{path.name}: policy.{comp}", f"precision '{prec}' has no Q/DQ ONNX form here",
                                "use fp32, fp16, int8, fp8 or int4 in a TensorRT recipe")
    by_comp = _weight_nodes(model)
    nodes = {p: [n for c, ns in by_comp.items() if wanted.get(c) == p for n in ns] for p in QDQ_PRECISIONS}
    # Activation statistics for the int4 clip search come from the float graph, before any Q/DQ.
    act2 = None
    if nodes["int4"] and args.int4_algorithm == "awq_clip" and feeds:
        act2 = _input_second_moments(model, nodes["int4"], feeds)
    for prec in ("int8", "fp8"):
        if nodes[prec]:
            if not feeds:
                raise BadInputError(f"{path.name}", f"{prec} needs calibration inputs and none were produced",
                                    "this graph has no calibration feeds; use fp16 or int4 for its components")
            model = _quantize_static(model, path, nodes[prec], prec, feeds, big=_is_big(model))
    if nodes["int4"]:
        if act2 is not None:
            model = _int4_awq_clip(model, nodes["int4"], args.int4_block_size, act2)
        else:
            model = _int4_qdq(model, nodes["int4"], args.int4_block_size)
    fp16 = [c for c, p in wanted.items() if p == "fp16"]
    if fp16:
        model = _fp16(model, fp16, comps)
    _tag_and_check(model, comps, nodes, path.name)
    _save(model, path)
    return wanted


def _is_big(model) -> bool:
    return sum(len(t.raw_data) for t in model.graph.initializer) > 1_800_000_000


def _quantize_static(model, path: Path, nodes: list[str], prec: str, feeds: list[dict], big: bool):
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    qtype = QuantType.QInt8 if prec == "int8" else QuantType.QFLOAT8E4M3FN
    if prec == "fp8":
        # ORT's float8 calibration (histograms) stacks every sample's tensors into one array, so
        # the samples must have one sequence length: cut each to the shortest prompt.
        feeds = _common_length(feeds)
    # Keep the attention-mask Add (and every non-weight op) out of Q/DQ: only the weight
    # MatMul/Gemm/Conv nodes of the chosen components are quantized.
    exclude = [n.name for n in model.graph.node if n.op_type == "Add"]
    names = {i.name for i in model.graph.input}
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(dir=path.parent) as td:
        src, dst = Path(td) / "in.onnx", Path(td) / "out.onnx"
        onnx.save(model, str(src), save_as_external_data=big)
        quantize_static(
            src, dst, _Reader(feeds, names), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Conv", "Gemm"], nodes_to_quantize=nodes, nodes_to_exclude=exclude,
            activation_type=qtype, weight_type=qtype,
            # TensorRT: per-channel int8 weights; fp8 per-tensor (what its fp8 GEMMs take).
            per_channel=prec == "int8",
            calibrate_method=CalibrationMethod.MinMax if prec == "int8" else CalibrationMethod.Distribution,
            use_external_data_format=big,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                           "MatMulConstBOnly": True, "AddQDQPairToWeight": False,
                           # One Q/DQ pair per quantized consumer: a residual Add or Reshape that
                           # reads the same activation keeps reading the float tensor.
                           "DedicatedQDQPair": True,
                           # Q/DQ on the inputs only, as TensorRT places them: a quantized MatMul
                           # output would round the logits and feed int8 into the mask Add.
                           "OpTypesToExcludeOutputQuantization": ["MatMul", "Conv", "Gemm"],
                           "CalibTensorRangeSymmetric": True},
        )
        return onnx.load(str(dst))


def _common_length(feeds: list[dict]) -> list[dict]:
    """Cut every input whose shape differs between samples to the smallest size on each axis that
    differs (the sequence axis: inputs_embeds, attention_mask, position_ids cut alike)."""
    out = [dict(f) for f in feeds]
    for name in feeds[0]:
        shapes = [f[name].shape for f in feeds if name in f]
        if len(set(shapes)) <= 1:
            continue
        lo = tuple(min(s[a] for s in shapes) for a in range(len(shapes[0])))
        for f in out:
            if name in f:
                f[name] = f[name][tuple(slice(0, n) for n in lo)]
    return out


def _int4_block(k: int, block_size: int) -> int | None:
    """The recipe's block size if it divides K, else the largest power of two >= 16 that does
    (TensorRT's INT4 block quantization wants whole blocks along K); None if none does."""
    b = block_size
    while b >= 16:
        if k % b == 0:
            return b
        b //= 2
    return None


def _int4_qdq(model, nodes: list[str], block_size: int):
    """Group the nodes by the block size their K allows, then quantize each group."""
    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[int, list[str]] = {}
    for n in model.graph.node:
        if n.name in nodes:
            b = _int4_block(int(inits[n.input[1]].dims[0]), block_size)
            if b is None:
                raise BadInputError(n.name, f"K={inits[n.input[1]].dims[0]} is not a multiple of 16, so it cannot be "
                                    "stored as int4 blocks", "keep this component at int8 or fp16")
            groups.setdefault(b, []).append(n.name)
    for b, names in sorted(groups.items(), reverse=True):
        if b != block_size:
            log.warning("int4: %d MatMul(s) use block %d (K not a multiple of %d)", len(names), b, block_size)
        model = _int4_qdq_block(model, names, b)
    return model


def _int4_qdq_block(model, nodes: list[str], block_size: int):
    """Weight-only int4 as DequantizeLinear(INT4 weight, scales, axis=0, block_size) -> MatMul:
    symmetric (no zero point), which TensorRT 10 reads as INT4 weight-only."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    include = set(nodes)
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in include]
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=4,
                                       quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, nodes_to_exclude=exclude,
                             algo_config=cfg)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    q.process()
    return q.model.model


CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 .. 0.5, as llm-awq's search


def _input_second_moments(model, nodes: list[str], feeds: list[dict]):
    """{node: mean x_k^2 over every calibration row} for the activation input of each node, from
    the float graph (ONNX Runtime with the inputs exposed as extra outputs)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    by_name = {n.name: n for n in model.graph.node}
    wanted = {name: by_name[name].input[0] for name in nodes}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for t in sorted(set(wanted.values()) - have):
        probe.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    sums: dict[str, Any] = {}
    rows: dict[str, int] = {}
    for f in feeds:
        outs = dict(zip(names, sess.run(None, {k: v for k, v in f.items() if k in inputs})))
        for t in set(wanted.values()):
            x = outs[t].reshape(-1, outs[t].shape[-1]).astype(np.float64)
            sums[t] = sums.get(t, 0) + (x * x).sum(0)
            rows[t] = rows.get(t, 0) + x.shape[0]
    return {name: sums[t] / max(rows[t], 1) for name, t in wanted.items()}


def _awq_clip_blocks(w, act2, block_size: int):
    """int4 codes [K, N] and scales [K/block, N] for W [K, N]: per (block, column), the clip ratio
    r in CLIP_RATIOS minimizing sum_k E[x_k^2] (w_k - q_k s)^2 with s = r max|w| / 7."""
    import numpy as np

    k, n = w.shape
    nb = k // block_size
    wb = w.reshape(nb, block_size, n).astype(np.float64)
    a = act2.reshape(nb, block_size, 1)
    amax = np.abs(wb).max(1)  # [nb, n]
    best_err = np.full((nb, n), np.inf)
    best_scale = np.zeros((nb, n))
    for r in CLIP_RATIOS:
        scale = np.where(amax > 0, amax * r / 7, 1.0)
        q = np.clip(np.rint(wb / scale[:, None]), -8, 7)
        err = (a * (wb - q * scale[:, None]) ** 2).sum(1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    q = np.clip(np.rint(wb / best_scale[:, None]), -8, 7).astype(np.int8).reshape(k, n)
    return q, best_scale.astype(np.float32)


def _int4_awq_clip(model, nodes: list[str], block_size: int, act2: dict[str, Any]):
    """Weight-only int4 as DequantizeLinear(INT4 [K, N], fp32 scales [K/block, N], axis 0,
    block_size) -> MatMul, with activation-aware clipped scales; the same graph form as
    _int4_qdq (MatMulNBitsQuantizer's QDQ output), so TensorRT reads it the same way."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    wanted = set(nodes)
    new_nodes, new_inits = [], []
    for node in model.graph.node:
        if node.name not in wanted:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype("float32")
        b = _int4_block(w.shape[0], block_size)
        if w.ndim != 2 or b is None:
            raise BadInputError(node.name, f"weight {list(w.shape)} cannot be stored as int4 blocks along K",
                                "keep this component at int8 or fp16")
        q, scales = _awq_clip_blocks(w, act2[node.name], b)
        qname, sname = f"{node.input[1]}_awq_Q4", f"{node.input[1]}_awq_scales"
        new_inits += [helper.make_tensor(qname, TensorProto.INT4, list(q.shape), q.reshape(-1).tolist()),
                      numpy_helper.from_array(scales, sname)]
        dq = helper.make_node("DequantizeLinear", [qname, sname], [f"{node.name}_awq_w"], name=f"{node.name}_DQ_Q4",
                              axis=0, block_size=b)
        node.input[1] = f"{node.name}_awq_w"
        new_nodes += [dq, node]
    replace_nodes(model, new_nodes, new_inits)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < 21:
            raise BadInputError("tensorrt-export opset", f"int4 DequantizeLinear needs opset 21, the graph has {op.version}",
                                "set opset: 21 (the default)")
    return model


def _tag_and_check(model, comps: dict[str, str], nodes: dict[str, list[str]], graph: str) -> None:
    """Tag each inserted Q/DQ node with its consumer's component, and check that every weight node
    the policy sent to int8/fp8/int4 really reads a DequantizeLinear of the right type (a quantizer
    that ignores its node list must never pass silently); no contrib ops may remain."""
    from onnx import TensorProto

    from edgemed.export.onnx import COMPONENT_KEY

    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    # MatMulNBitsQuantizer (QDQ) replaces MatMul 'x' by 'x_matmul_Q4' fed by DequantizeLinear 'x_DQ_Q4'.
    for n in model.graph.node:
        for suffix in ("_matmul_Q4", "_DQ_Q4"):
            base = n.name.removesuffix(suffix)
            if base != n.name and base in comps:
                comps.setdefault(n.name, comps[base])
                if suffix == "_matmul_Q4":
                    by_name.setdefault(base, n)

    def tag(node, comp):
        if comp and not any(p.key == COMPONENT_KEY for p in node.metadata_props):
            e = node.metadata_props.add()
            e.key, e.value = COMPONENT_KEY, comp

    for n in model.graph.node:
        if n.name in comps:
            tag(n, comps[n.name])
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            seen, frontier = set(), [n]
            comp = None
            while frontier and comp is None:  # walk forward through Q->DQ to the quantized op
                cur = frontier.pop()
                for c in consumers.get(cur.output[0], []):
                    if c.name in comps:
                        comp = comps[c.name]
                        break
                    if c.name not in seen:
                        seen.add(c.name)
                        frontier.append(c)
            tag(n, comp)
    want_type = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN, "int4": TensorProto.INT4}
    wrong = []
    for prec, names in nodes.items():
        for name in names:
            node = by_name.get(name)
            dq = producers.get(node.input[1]) if node is not None else None
            if dq is not None and dq.op_type in ("Reshape", "Transpose"):
                dq = producers.get(dq.input[0])
            # The weight must be stored quantized (an initializer of the wanted type read by a DQ).
            stored = inits.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if stored is not None and stored.data_type == want_type[prec]:
                continue
            got = "float" if stored is None else TensorProto.DataType.Name(stored.data_type)
            wrong.append(f"{name} ({comps.get(name)}): wanted {prec}, got {got}")
    contrib = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if wrong or contrib:
        msg = f"{graph}: the Q/DQ quantizer did not follow the component policy"
        if wrong:
            msg += f" for {len(wrong)} node(s), e.g. {'; '.join(wrong[:3])}"
        if contrib:
            msg += f"; contrib ops TensorRT cannot parse remain: {', '.join(contrib)}"
        raise EdgemedError(msg)


# --- build profiles --------------------------------------------------------------------------------

def build_profiles(work_dir: Path, text: dict, image: dict | None, precisions: dict[str, dict[str, str]],
                   args: TrtExportArgs, usable_memory_gb: float) -> dict[str, Any]:
    """Optimization profiles (min/opt/max per input), precision flags and workspace per graph.

    The decoder gets two profiles, as TensorRT-LLM builds them: `prefill` (any chunk length, any
    past) and `decode` (one token, past >= 1, tuned at half the context); the runtime selects the
    profile per call."""
    ctx = args.max_context
    n_img_tok = image["num_image_tokens"] if image else 0
    opt_prompt = min(ctx, n_img_tok + 48)
    kv, hd, d = text["num_kv_heads"], text["head_dim"], text["hidden_size"]
    workspace = int(min(usable_memory_gb * 1e9 * args.workspace_fraction, args.max_workspace_gb * 1e9))
    graphs: dict[str, Any] = {}
    for name, comp_prec in precisions.items():
        flags = sorted({BUILDER_FLAGS[p] for p in comp_prec.values() if p in BUILDER_FLAGS})
        if args.fp16_fallback and any(p in QDQ_PRECISIONS for p in comp_prec.values()) and "FP16" not in flags:
            flags.append("FP16")
        entry: dict[str, Any] = {"engine": f"engines/{Path(name).stem}.engine", "precision_flags": sorted(flags),
                                 "precisions": comp_prec, "workspace_bytes": workspace}
        if name == "vision_encoder.onnx":
            s = image["image_size"]
            entry["profiles"] = [{"name": "images", "shapes": {
                "pixel_values": _mom([1, 3, s, s], [1, 3, s, s], [args.max_images, 3, s, s])}}]
        elif name == "embed_tokens.onnx":
            entry["profiles"] = [{"name": "tokens", "shapes": {"input_ids": _mom([1, 1], [1, opt_prompt], [1, ctx])}}]
        else:
            past_in = _past_names(work_dir / name)
            prefill = {"inputs_embeds": _mom([1, 1, d], [1, opt_prompt, d], [1, ctx, d]),
                       "attention_mask": _mom([1, 1], [1, opt_prompt], [1, ctx]),
                       "position_ids": _mom([1, 1], [1, opt_prompt], [1, ctx])}
            decode = {"inputs_embeds": _mom([1, 1, d], [1, 1, d], [1, 1, d]),
                      "attention_mask": _mom([1, 2], [1, ctx // 2 + 1], [1, ctx]),
                      "position_ids": _mom([1, 1], [1, 1], [1, 1])}
            if "token_type_ids" in _input_names(work_dir / name):
                prefill["token_type_ids"] = prefill["position_ids"]
                decode["token_type_ids"] = decode["position_ids"]
            for p in past_in:
                prefill[p] = _mom([1, kv, 0, hd], [1, kv, 0, hd], [1, kv, ctx - 1, hd])
                decode[p] = _mom([1, kv, 1, hd], [1, kv, ctx // 2, hd], [1, kv, ctx - 1, hd])
            entry["profiles"] = [{"name": "prefill", "shapes": prefill}, {"name": "decode", "shapes": decode}]
        graphs[name] = entry
    return {"max_context": ctx, "max_images": args.max_images, "graphs": graphs}


def _mom(lo, opt, hi) -> dict[str, list[int]]:
    return {"min": lo, "opt": opt, "max": hi}


def _input_names(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _past_names(path: Path) -> list[str]:
    return [n for n in _input_names(path) if n.startswith("past_key_values.")]


def validate_profiles(profiles: dict[str, Any], artifact_dir: Path) -> list[str]:
    """Every graph input has a shape in every profile, of the graph's rank, matching its static
    dims, with min <= opt <= max; no profile names an input the graph lacks."""
    import onnx

    problems = []
    for name, entry in profiles.get("graphs", {}).items():
        path = artifact_dir / name
        if not path.exists():
            problems.append(f"{name}: profile for a graph that is not in the artifact")
            continue
        inputs = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                  for i in onnx.load(str(path), load_external_data=False).graph.input}
        if not entry.get("profiles"):
            problems.append(f"{name}: no optimization profile")
        for prof in entry.get("profiles", []):
            where = f"{name} profile {prof.get('name')}"
            missing = set(inputs) - set(prof["shapes"])
            extra = set(prof["shapes"]) - set(inputs)
            if missing:
                problems.append(f"{where}: no shape for {sorted(missing)}")
            if extra:
                problems.append(f"{where}: shapes for inputs the graph lacks {sorted(extra)}")
            for inp, mom in prof["shapes"].items():
                dims = inputs.get(inp)
                if dims is None:
                    continue
                lo, opt, hi = mom["min"], mom["opt"], mom["max"]
                if not len(lo) == len(opt) == len(hi) == len(dims):
                    problems.append(f"{where}: {inp} rank {len(lo)}/{len(opt)}/{len(hi)} != graph rank {len(dims)}")
                    continue
                for k, static in enumerate(dims):
                    if not (0 <= lo[k] <= opt[k] <= hi[k]):
                        problems.append(f"{where}: {inp} dim {k} not 0 <= min <= opt <= max ({lo[k]}, {opt[k]}, {hi[k]})")
                    if static is not None and static > 0 and not (lo[k] == opt[k] == hi[k] == static):
                        problems.append(f"{where}: {inp} dim {k} is {static} in the graph")
    return problems
