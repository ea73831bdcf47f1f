"""ONNX export and quantization steps.

Quantized graphs use ONNX Runtime's operators and, where they do the job, its quantizers: int8 =
MatMulNBits bits 8 (`MatMulNBitsQuantizer`) or `quantize_dynamic`; int4 = MatMulNBits, its
blocks chosen by edgemed's least-squares grid (`mse`, the default: ONNX Runtime's rtn takes each
block's min/max), GPTQ or the float-minimum `fmin` rewrite, or by `MatMulNBitsQuantizer` (rtn,
HQQ, k-quant); an int8 embedding table = GatherBlockQuantized; fp16 = ONNX Runtime's float16
converter. The component policy is compiled to per-node choices from
the module path every exported node carries (see edgemed.export.onnx.node_components).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, Field

from edgemed.errors import BadInputError
from edgemed.steps.base import Step, StepArgs

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.pipeline import Context

log = logging.getLogger(__name__)
GRAPHS = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")


class OnnxExportArgs(StepArgs):
    opset: int = Field(18, ge=17, le=23)
    # auto: onnxruntime-genai's builder (fused GroupQueryAttention decoder) where it supports the
    # model and is installed, else torch.onnx; the manifest notes which one wrote the decoder.
    decoder: Literal["auto", "torch", "genai"] = "auto"


class OnnxExport(Step):
    name = "onnx-export"
    stage = "export"
    formats = ("onnx",)
    summary = "vision encoder + projector, token embeddings and a KV-cache decoder as three ONNX graphs"
    Args = OnnxExportArgs

    def run(self, ctx: "Context") -> None:
        from edgemed.export.genai_decoder import builder_unsupported_reason
        from edgemed.export.onnx import export_onnx

        builder = self.args.decoder
        if builder != "torch":
            reason = builder_unsupported_reason(ctx.cm)
            if reason is not None and builder == "genai":
                raise BadInputError(f"recipe {ctx.recipe.name}: onnx-export decoder=genai", reason,
                                    "use decoder: auto or torch")
            if reason is not None:
                ctx.notes.append(f"decoder exported with torch.onnx: {reason}")
                builder = "torch"
        names, used, decoder_note = export_onnx(ctx.cm, ctx.work_dir, opset=self.args.opset,
                                                progress=ctx.progress, decoder_builder=builder)
        ctx.notes.append(decoder_note)
        ctx.runtime["decoder_builder"] = used
        # The builder's GroupQueryAttention reads past and writes present in one shared buffer.
        ctx.runtime["kv_cache"] = "shared_buffer" if used == "genai" else "concat"
        for name in names:
            ctx.describe(name, component=_graph_component(name), fmt="onnx", precision="fp32")


def _block_size(v: int) -> int:
    """MatMulNBits blocks run along K in powers of two from 16."""
    if v < 16 or v & (v - 1):
        raise ValueError("block_size must be a power of two >= 16")
    return v


BlockSize = Annotated[int, AfterValidator(_block_size)]


def fit_block(k: int, block: int) -> int:
    """The largest power-of-two block <= `block` (and >= 16) that divides K, else `block` (such a
    MatMul goes to ONNX Runtime's rtn, which pads the last block). SmolLM2's K = 576 takes 64
    when 128 is asked: padded rtn blocks of 128 there cost KLD 1.48 on the demo model, fmin
    blocks of 64 1.01."""
    b = block
    while k % b and b > 16:
        b //= 2
    return b if k % b == 0 else block


class Int4Args(StepArgs):
    # mse: blocks on ONNX Runtime's asymmetric MatMulNBits grid (integer zero points, its fastest
    # CPU kernel), each block's scale and zero point searched for the least squared error and the
    # scale refitted (edgemed.steps.gptq.mse_quantize); rtn, hqq and k_quant are ONNX Runtime's
    # MatMulNBitsQuantizer algorithms (rtn spans each block's min..max; HQQ's float zero points
    # have no fast CPU kernel in ONNX Runtime 1.32: about 10x slower here).
    # fmin: affine blocks with a float minimum (llama.cpp's Q4_1 grid) as a symmetric MatMulNBits
    # plus a block-sum correction (see _fmin): exact on Q4_1-grid weights, ~14 more small nodes
    # per layer (0.85x the speed of mse on SmolLM2-135M here).
    # gptq: edgemed's GPTQ on the rtn grid, from calibration passes through the decoder graph
    # (edgemed.steps.gptq); decoder graph only, other graphs use rtn.
    algorithm: Literal["mse", "fmin", "rtn", "gptq", "hqq", "k_quant"] = "mse"
    block_size: BlockSize = 32
    # Where activations are fp16 (GPU targets, see OnnxQuantizeArgs.activations) scales are fp16
    # and blocks are 128, the W4A16 group of AWQ and TensorRT-LLM: decode there is bound by the
    # bytes read, and block 32 would cost 4.5 (rtn) to 5.0 (fmin) bits per weight instead of 4.1-4.25.
    fp16_block_size: BlockSize = 128
    symmetric: bool = False
    # 4 = int8 activations inside MatMulNBits: the fastest CPU kernels (ORT docs).
    accuracy_level: int = Field(4, ge=0, le=4)
    calibration_samples: int = Field(16, ge=1, le=1024)  # gptq and mse: calibration passes through the decoder
    # Language projections kept at int8 (MatMulNBits bits 8) where activations are fp32 (CPU
    # targets), matched as substrings of the decoder's MatMul names (q_proj, qkv_proj, down_proj):
    # llama.cpp's Q4_K_M likewise gives attn_v and ffn_down more bits. On SmolLM2-135M, int8
    # attention q/k/v and MLP down with mse int4 elsewhere: KLD 0.035 (all int4: 0.10) at 1.02-1.09x
    # the speed of onnxruntime-genai's int4 model (bench_smollm2.py, two runs). In the fp16 (GPU) layout every projection is int4,
    # blocks of fp16_block_size (W4A16, the layout AWQ and TensorRT-LLM ship): there decode is
    # bound by bytes and memory is the limit (a 7B LLaVA on an 8 GB Jetson).
    int8_projections: list[str] = Field(default_factory=list)


class Int8Args(StepArgs):
    # nbits: weight-only int8 in blocks along K (MatMulNBits bits=8), with accuracy_level 4
    # quantizing activations per block too, which is what llama.cpp's Q8_0 does; dynamic:
    # quantize_dynamic (per-channel weights, one activation scale per tensor), which an
    # outlier-heavy LLM punishes (SmolLM2-135M: KLD 1.27 vs the parent, measured here).
    method: Literal["nbits", "dynamic"] = "nbits"
    block_size: BlockSize = 32
    symmetric: bool = True
    accuracy_level: int = Field(4, ge=0, le=4)
    per_channel: bool = True  # dynamic only
    reduce_range: bool = False  # dynamic only



class OnnxQuantizeArgs(StepArgs):
    int4: Int4Args = Field(default_factory=Int4Args)
    int8: Int8Args = Field(default_factory=Int8Args)
    # The float type of activations, float weights and the KV cache. auto: fp16 on a target whose
    # accelerator is a GPU that runs fp16 (tensor cores; half the KV cache and the float weights),
    # fp32 on a CPU (ONNX Runtime's CPU kernels are fastest in fp32), and fp32 for the families in
    # FP32_ONLY_FAMILIES whatever the target.
    activations: Literal["auto", "fp32", "fp16"] = "auto"


# Families whose activations leave fp16's range (|x| <= 65504): an fp16 graph would compute inf/NaN.
FP32_ONLY_FAMILIES = {"gemma3": "Gemma 3 was trained in bf16 and its residual stream exceeds fp16's range"}


def onnx_activations(choice: str, target, family: str) -> tuple[str, str | None]:
    """(fp32 | fp16, why) for an ONNX artifact of `family` on `target` (a Target or None)."""
    if choice != "auto":
        return choice, None
    acc = getattr(target, "accelerator", None)
    if acc is None or acc.kind != "gpu" or "fp16" not in target.precisions:
        return "fp32", None
    if family in FP32_ONLY_FAMILIES:
        return "fp32", f"activations stay fp32 on {target.name}: {FP32_ONLY_FAMILIES[family]}"
    return "fp16", f"activations, float weights and the KV cache are fp16 on {target.name} (a GPU)"


class OnnxQuantize(Step):
    name = "onnx-quantize"
    stage = "artifact"
    formats = ("onnx",)
    summary = "ONNX Runtime quantizers per the component policy (int8 dynamic, int4 MatMulNBits, fp16)"
    Args = OnnxQuantizeArgs

    def run(self, ctx: "Context") -> None:
        policy = ctx.recipe.policy
        if policy.embed not in ("fp32", "fp16", "int8"):
            raise BadInputError(f"recipe {ctx.recipe.name}: policy.embed", f"'{policy.embed}' is not supported for ONNX",
                                "use fp32, fp16 or int8 for embed")
        activations, why = onnx_activations(self.args.activations, ctx.target, ctx.cm.family)
        ctx.runtime["activations"] = activations
        if activations == "fp16":
            why = (why or "activations, float weights and the KV cache are fp16 (the recipe says so)") + \
                f"; int4 in blocks of up to {self.args.int4.fp16_block_size} with fp16 scales"
        if why:
            ctx.notes.append(why)
        if activations == "fp32" and self.args.int4.int8_projections and "int4" in policy.model_dump().values():
            ctx.notes.append("int4 language model with its " + ", ".join(self.args.int4.int8_projections)
                             + " projections (where present) at int8")
        for graph in GRAPHS:
            path = ctx.work_dir / graph
            if not path.exists():
                continue
            ctx.progress(f"quantize {graph}")
            feeds = None
            if graph == "decoder_model_merged.onnx" and self.args.int4.algorithm in ("gptq", "mse"):
                feeds = lambda: _decoder_feeds(ctx, self.args.int4.calibration_samples)  # noqa: E731
            precisions = quantize_graph(path, policy, self.args, feeds, activations)
            ctx.describe(graph, component=_graph_component(graph), fmt="onnx",
                         precision="+".join(sorted(set(precisions.values()))) or "fp32")


def _graph_component(name: str) -> str:
    return {"vision_encoder.onnx": "vision+projector", "embed_tokens.onnx": "embed",
            "decoder_model_merged.onnx": "language+lm_head"}[name]


def _fold_weight_transposes(model) -> int:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T) with W^T stored: ONNX Runtime's weight quantizers
    only see constant B inputs, and a tied lm_head arrives as a Transpose of the embedding."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    folded = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        tr = producers.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[tr.input[0]])
        if w.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = tr.input[0] + "_transposed"
        if name not in inits:
            t = numpy_helper.from_array(np.ascontiguousarray(w.T), name)
            model.graph.initializer.append(t)
            inits[name] = t
        node.input[1] = name
        folded += 1
    if folded:
        # Drop initializers and Transposes nobody reads any more.
        used = {i for n in model.graph.node for i in n.input}
        outs = {o.name for o in model.graph.output}
        keep = [n for n in model.graph.node if n.op_type != "Transpose" or any(o in used or o in outs for o in n.output)]
        replace_nodes(model, keep, [])
    return folded


def _gemm_to_matmul(model) -> int:
    """Gemm(x, W, transB=1) with a constant W and no bias -> MatMul(x, W^T), same node name (the
    component tag follows it). torch.onnx writes a Linear on a 2-D input as Gemm (the MoE block
    flattens tokens), and ONNX Runtime's weight quantizers only take MatMul."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes, converted = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and len(node.input) == 2 and node.input[1] in inits
                and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0):
            w = numpy_helper.to_array(inits[node.input[1]])
            if attrs.get("transB", 0):
                w = np.ascontiguousarray(w.T)
            name = node.input[1] + ("_transposed" if attrs.get("transB", 0) else "")
            if name not in inits:
                t = numpy_helper.from_array(w, name)
                model.graph.initializer.append(t)
                inits[name] = t
            mm = helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name)
            mm.metadata_props.extend(node.metadata_props)
            nodes.append(mm)
            converted += 1
        else:
            nodes.append(node)
    if converted:
        replace_nodes(model, nodes, [])
    return converted


def quantize_graph(path: Path, policy, args: OnnxQuantizeArgs, calibration_feeds=None,
                   activations: str = "fp32") -> dict[str, str]:
    """Quantize one graph in place. Returns {component: precision} for the components present.
    calibration_feeds: a callable giving input feeds for this graph (needed by gptq).
    activations fp16: int4 in blocks of args.int4.fp16_block_size, then the whole graph in fp16
    (the decoder's inputs_embeds, KV cache and logits too; the other graphs keep fp32 inputs and
    outputs, cast inside); components the policy leaves at fp32 are stored fp16."""
    import onnx

    from edgemed.export.onnx import DECODER, node_components

    model = onnx.load(str(path))
    _fold_weight_transposes(model)
    _gemm_to_matmul(model)
    comps = node_components(model)
    present = set(comps.values())
    wanted = {c: getattr(policy, c) for c in present if hasattr(policy, c)}
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    inits = {t.name for t in model.graph.initializer}
    by_prec: dict[str, list[str]] = {}
    for n in matmuls:
        if len(n.input) > 1 and n.input[1] in inits and n.name in comps:
            by_prec.setdefault(wanted.get(comps[n.name], "fp32"), []).append(n.name)
    for prec in by_prec:
        if prec not in ("fp32", "fp16", "int8", "int4"):
            raise BadInputError(f"{path.name}: policy", f"precision '{prec}' cannot be expressed in ONNX",
                                "use fp32, fp16, int8 or int4 for ONNX recipes")
    block4 = args.int4.fp16_block_size if activations == "fp16" else args.int4.block_size
    if by_prec.get("int4") and args.int4.int8_projections and activations == "fp32":
        keep = [n for n in by_prec["int4"] if comps.get(n) == "language"
                and any(p in n for p in args.int4.int8_projections)]
        by_prec["int4"] = [n for n in by_prec["int4"] if n not in set(keep)]
        by_prec.setdefault("int8", []).extend(keep)
    if by_prec.get("int4"):
        if args.int4.algorithm == "mse":
            model = _mse(model, by_prec["int4"], block4, args.int4.accuracy_level,
                         calibration_feeds() if calibration_feeds is not None else None)
        elif args.int4.algorithm == "fmin":
            model = _fmin(model, by_prec["int4"], block4, args.int4.accuracy_level)
        elif args.int4.algorithm == "gptq" and calibration_feeds is not None:
            model = _gptq(model, by_prec["int4"], block4, args.int4.accuracy_level, calibration_feeds())
        else:
            algorithm = "rtn" if args.int4.algorithm == "gptq" else args.int4.algorithm
            symmetric = False if args.int4.algorithm == "gptq" else args.int4.symmetric
            for block, nodes in _by_fitted_block(model, by_prec["int4"], block4).items():
                model = _nbits(model, nodes, 4, block, symmetric, args.int4.accuracy_level, algorithm)
    if by_prec.get("int8"):
        if args.int8.method == "nbits":
            model = _nbits(model, by_prec["int8"], 8, args.int8.block_size, args.int8.symmetric,
                           args.int8.accuracy_level, "rtn")
        else:
            model = _int8_dynamic(model, path, by_prec["int8"], args.int8)
    if wanted.get("embed") == "int8":
        _gather_int8(model, comps, args.int8.block_size)
    _retag_and_check(model, comps, by_prec, path.name)
    if activations == "fp16":
        model = _fp16_graph(model, keep_io_types=path.name != DECODER)
        wanted = {c: "fp16" if p == "fp32" else p for c, p in wanted.items()}
    elif "fp16" in wanted.values():
        model = _fp16(model, [c for c, p in wanted.items() if p == "fp16"], comps)
    _save(model, path)
    return wanted


def _by_fitted_block(model, nodes: list[str], block: int) -> dict[int, list[str]]:
    """Group MatMuls by fit_block(K, block), for the quantizers that take one block size per call."""
    dims = {t.name: t.dims[0] for t in model.graph.initializer if len(t.dims) == 2}
    wanted = set(nodes)
    k_of = {n.name: dims.get(n.input[1], block) for n in model.graph.node if n.name in wanted}
    groups: dict[int, list[str]] = {}
    for name in nodes:
        groups.setdefault(fit_block(k_of.get(name, block), block), []).append(name)
    return groups


def replace_nodes(model, nodes: list, new_initializers: list) -> None:
    """Make `nodes` the graph's node list, add `new_initializers`, and drop the initializers no
    node reads any more (the float weights a quantizer replaced)."""
    used = {i for n in nodes for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used] + list(new_initializers)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _retag_and_check(model, comps: dict[str, str], by_prec: dict[str, list[str]], graph: str) -> None:
    """Quantizers replace nodes (MatMul 'x' -> MatMulNBits 'x_Q4'): carry each node's component
    tag over, and check that every MatMul the policy sent to int4/int8 really became one, so a
    quantizer that ignores its node list can never pass silently."""
    from edgemed.export.onnx import COMPONENT_KEY

    wanted_bits = {n: 4 for n in by_prec.get("int4", [])}
    wanted_bits.update({n: 8 for n in by_prec.get("int8", [])})
    got_bits: dict[str, int] = {}
    for node in model.graph.node:
        base = node.name
        if node.op_type == "MatMulNBits":
            base = node.name.rsplit("_Q", 1)[0]
            got_bits[base] = next(a.i for a in node.attribute if a.name == "bits")
        elif node.name.rsplit("_", 1)[-1] in ("blocksum", "offset", "fmin"):
            base = node.name.rsplit("_", 1)[0]
        elif node.op_type == "MatMulInteger":
            base = node.name.removesuffix("_quant")
            got_bits[base] = 8
        comp = comps.get(base)
        if comp and not any(p.key == COMPONENT_KEY for p in node.metadata_props):
            entry = node.metadata_props.add()
            entry.key, entry.value = COMPONENT_KEY, comp
    wrong = [f"{n} ({comps.get(n)}): wanted {b}-bit, got {got_bits.get(n, 'float')}"
             for n, b in wanted_bits.items() if got_bits.get(n) != b]
    if wrong:
        from edgemed.errors import EdgemedError

        raise EdgemedError(f"{graph}: the quantizer did not follow the component policy for {len(wrong)} "
                           f"node(s), e.g. {'; '.join(wrong[:3])}")


def _nbits(model, nodes: list[str], bits: int, block_size: int, symmetric: bool, accuracy_level: int,
           algorithm: str):
    """Weight-only MatMulNBits on exactly `nodes` (every other MatMul is excluded)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig, KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    include = set(nodes)
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in include]
    if algorithm == "hqq":
        cfg = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    elif algorithm == "k_quant":
        cfg = KQuantWeightOnlyQuantConfig()
    else:
        cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                           accuracy_level=accuracy_level, bits=bits)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, nodes_to_exclude=exclude, algo_config=cfg)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    q.process()
    return q.model.model


def _fmin(model, nodes: list[str], block_size: int, accuracy_level: int):
    """int4 with a float minimum per block: w = d * q + m, q in 0..15, d = (max - min) / 15.

    Why our own code: ONNX Runtime's quantizers store integer zero points, which cannot put a
    block's minimum exactly on the grid (every weight of the block then shifts by the same
    amount, and those errors add up along K); its float-zero-point kernels (HQQ) are slow on CPU.
    We write w = d * (q - 8) + o with o = m + 8d: the first term is a *symmetric* MatMulNBits (the
    fast kernel), the second is sum_b o[b, n] * blocksum_b(x), a [K/block x N] fp32 MatMul on the
    block sums of x (one small MatMul per distinct input, shared by the projections reading it).
    On SmolLM2-135M, whose weights sit on the Q4_1 grid, this is the exact representation.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    wanted = set(nodes)
    requested_block = block_size
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, new_inits, blocksums, rtn_fallback = [], [], {}, []
    for node in model.graph.node:
        if node.name not in wanted:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        k, n = w.shape
        block_size = fit_block(k, requested_block)
        if k % block_size:
            rtn_fallback.append(node.name)
            new_nodes.append(node)
            continue
        nb = k // block_size
        blocks = w.T.reshape(n, nb, block_size)
        lo, hi = blocks.min(-1), blocks.max(-1)
        d = (hi - lo) / 15
        q = np.clip(np.rint((blocks - lo[..., None]) / np.where(d > 0, d, 1)[..., None]), 0, 15).astype(np.uint8)
        name = node.name
        new_inits += [
            numpy_helper.from_array((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), f"{name}.q4"),
            numpy_helper.from_array(d.astype(np.float32).reshape(-1), f"{name}.scales"),
            numpy_helper.from_array(np.ascontiguousarray((lo + 8 * d).T, dtype=np.float32), f"{name}.offsets"),
        ]
        x = node.input[0]
        if (x, k) not in blocksums:
            ind = np.zeros((k, nb), np.float32)
            ind[np.arange(k), np.arange(k) // block_size] = 1
            ind_name = f"{name}.block_indicator"
            new_inits.append(numpy_helper.from_array(ind, ind_name))
            blocksums[(x, k)] = f"{name}.blocksum"
            new_nodes.append(helper.make_node("MatMul", [x, ind_name], [blocksums[(x, k)]], name=f"{name}_blocksum"))
        new_nodes += [
            helper.make_node("MatMulNBits", [x, f"{name}.q4", f"{name}.scales"], [f"{name}.main"], name=f"{name}_Q4",
                             domain="com.microsoft", K=k, N=n, bits=4, block_size=block_size,
                             accuracy_level=accuracy_level),
            helper.make_node("MatMul", [blocksums[(x, k)], f"{name}.offsets"], [f"{name}.offset"], name=f"{name}_offset"),
            helper.make_node("Add", [f"{name}.main", f"{name}.offset"], [node.output[0]], name=f"{name}_fmin"),
        ]
    return _finish_int4_rewrite(model, new_nodes, new_inits, rtn_fallback, requested_block, accuracy_level, "fmin")


def _gather_int8(model, comps: dict[str, str], block_size: int) -> None:
    """The embedding table's Gather -> GatherBlockQuantized (com.microsoft): uint8 rows in blocks of
    `block_size` along the hidden size, one scale per block, symmetric around 128 (ONNX Runtime's
    CPU and CUDA kernels read this; onnxruntime-genai writes its quantized embeddings the same way). One row is read per token, so
    this is about memory, not speed: a 7B's table goes from 263 MB (fp16) to 139 MB."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes, new_inits = [], []
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (node.op_type != "Gather" or comps.get(node.name) != "embed" or node.input[0] not in inits
                or axis != 0 or len(inits[node.input[0]].dims) != 2):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        v, h = w.shape
        b = fit_block(h, block_size)
        if h % b:
            nodes.append(node)  # no block divides the hidden size: the table stays float (logged)
            log.warning("embed: hidden size %d has no int8 block <= %d; the table stays float", h, block_size)
            continue
        blocks = w.reshape(v, h // b, b)
        scale = np.abs(blocks).max(-1) / 127
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = (np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8).reshape(v, h)
        name = node.input[0]
        new_inits += [numpy_helper.from_array(q, f"{name}.q8"), numpy_helper.from_array(scale, f"{name}.scales")]
        # No zero_points input: for uint8 data at 8 bits ONNX Runtime's default zero point is 128.
        gq = helper.make_node("GatherBlockQuantized", [f"{name}.q8", node.input[1], f"{name}.scales"],
                              list(node.output), name=node.name, domain="com.microsoft", bits=8, block_size=b,
                              gather_axis=0, quantize_axis=1)
        gq.metadata_props.extend(node.metadata_props)
        nodes.append(gq)
    replace_nodes(model, nodes, new_inits)
    if new_inits and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _mse(model, nodes: list[str], block_size: int, accuracy_level: int, feeds: list[dict] | None = None):
    """int4 on the asymmetric MatMulNBits grid with least-squares block grids (gptq.mse_quantize),
    each weight's error weighted by its input channel's mean square on the calibration feeds (as
    llama.cpp's imatrix weights its k-quants) where feeds are given. On SmolLM2-135M (int4 recipe,
    bench_smollm2.py): KLD 0.035 weighted; 0.048 unweighted with a smaller search (21 x 5)."""
    from edgemed.steps.gptq import mean_squares, mse_quantize

    importance = mean_squares(model, _inputs_of(model, nodes), feeds) if feeds else {}
    return _asym_int4(model, nodes, block_size, accuracy_level, "mse",
                      lambda w, x, b: mse_quantize(w, b, importance.get(x)))


def _gptq(model, nodes: list[str], block_size: int, accuracy_level: int, feeds: list[dict]):
    """GPTQ on the asymmetric MatMulNBits grid (edgemed.steps.gptq) for exactly `nodes`."""
    from edgemed.steps.gptq import gptq_quantize, hessians

    h = hessians(model, _inputs_of(model, nodes), feeds)
    return _asym_int4(model, nodes, block_size, accuracy_level, "gptq", lambda w, x, b: gptq_quantize(w, h[x], b))


def _inputs_of(model, nodes: list[str]) -> list[str]:
    wanted = set(nodes)
    return sorted({n.input[0] for n in model.graph.node if n.name in wanted})


def _asym_int4(model, nodes: list[str], block_size: int, accuracy_level: int, algorithm: str, quantize):
    """Replace each MatMul in `nodes` by an asymmetric int4 MatMulNBits whose grid comes from
    quantize(weight [K, N], input tensor name, block) -> (q, scales, zero points)."""
    from onnx import numpy_helper

    from edgemed.steps.gptq import matmulnbits_initializers

    wanted = set(nodes)
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, new_inits, rtn_fallback = [], [], []
    for node in model.graph.node:
        if node.name not in wanted:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        k, n = w.shape
        b = fit_block(k, block_size)
        if k % b:
            rtn_fallback.append(node.name)
            new_nodes.append(node)
            continue
        q, scales, zps = quantize(w, node.input[0], b)
        new_inits += matmulnbits_initializers(node.name, q, scales, zps, b)
        new_nodes.append(_asym_nbits_node(node, k, n, b, accuracy_level))
    return _finish_int4_rewrite(model, new_nodes, new_inits, rtn_fallback, block_size, accuracy_level, algorithm)


def _asym_nbits_node(node, k: int, n: int, block: int, accuracy_level: int):
    """The MatMulNBits that replaces MatMul `node`, reading matmulnbits_initializers' tensors."""
    from onnx import helper

    name = node.name
    return helper.make_node(
        "MatMulNBits", [node.input[0], f"{name}.q4", f"{name}.scales", f"{name}.zero_points"], list(node.output),
        name=f"{name}_Q4", domain="com.microsoft", K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level)


def _finish_int4_rewrite(model, nodes, initializers, rtn_fallback: list[str], block_size: int,
                         accuracy_level: int, algorithm: str):
    """Install a rewritten node list (fmin, mse, gptq) and send MatMuls whose K is not a multiple of
    the block to ONNX Runtime's rtn instead (logged: never silently)."""
    from onnx import helper

    replace_nodes(model, nodes, initializers)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if rtn_fallback:
        log.warning("%s: K not a multiple of %d for %d MatMul(s); they use rtn", algorithm, block_size,
                    len(rtn_fallback))
        model = _nbits(model, rtn_fallback, 4, block_size, False, accuracy_level, "rtn")
    return model


def _decoder_feeds(ctx: "Context", count: int) -> list[dict]:
    """Prefill feeds for the decoder graph from the recipe's calibration set: each prompt (with its
    image where the model has a vision tower) embedded by the PyTorch model, an empty past."""
    import numpy as np
    import torch

    from edgemed.steps.imatrix import calibration_set

    cm = ctx.cm
    calib = calibration_set(cm, ctx.recipe.calibration, "multimodal" if cm.multimodal else "text", count)
    embed = cm.adapter.embed_tokens(cm.model)
    t = cm.text
    feeds = []
    for prompt, answer, image in calib.samples:
        with_image = image is not None and cm.multimodal
        ids = torch.tensor(cm.tokenizer(cm.build_prompt(prompt, with_image) + answer, add_special_tokens=False).input_ids)
        with torch.no_grad():
            emb = embed(ids[None]).float()
            image_mask = ids == cm.image.image_token_id if cm.multimodal else torch.zeros_like(ids, dtype=torch.bool)
            if with_image:
                from edgemed.runtime.preprocess import preprocess

                pv = torch.from_numpy(preprocess(image, cm.image.to_dict()))
                emb[0, image_mask] = cm.image_features(pv).reshape(-1, emb.shape[-1])
        n = len(ids)
        feed = {"inputs_embeds": emb.numpy(), "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None], "token_type_ids": image_mask.numpy()[None].astype(np.int64)}
        for i in range(t.num_layers):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32)
        feeds.append(feed)
    return feeds


def _int8_dynamic(model, path: Path, nodes: list[str], a: Int8Args):
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=path.parent) as td:
        src, dst = Path(td) / "in.onnx", Path(td) / "out.onnx"
        onnx.save(model, str(src))
        quantize_dynamic(src, dst, per_channel=a.per_channel, reduce_range=a.reduce_range,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_quantize=nodes, extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(dst))


def _fp16(model, components: list[str], comps: dict[str, str]):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    block = [n.name for n in model.graph.node if comps.get(n.name) not in components]
    return convert_float_to_float16(model, keep_io_types=True, node_block_list=block,
                                    op_block_list=["MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear",
                                                   "DequantizeLinear", "QuantizeLinear"])


def _fp16_graph(model, keep_io_types: bool):
    """Every float tensor fp16, MatMulNBits scales and fmin offsets included (the quantizers wrote
    them fp32 from fp32 weights; rounding a scale to fp16 moves it by at most 2^-11 of itself).
    int8 dynamic quantization stays fp32 inside casts: DynamicQuantizeLinear takes fp32 only."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=keep_io_types,
                                    op_block_list=["MatMulInteger", "DynamicQuantizeLinear",
                                                   "DequantizeLinear", "QuantizeLinear"])


def _save(model, path: Path) -> None:
    import onnx

    # Protobuf caps a file at 2 GB; ByteSize() itself fails past that, so count the tensors.
    big = sum(len(t.raw_data) for t in model.graph.initializer) > 1_800_000_000
    data = path.with_suffix(".onnx.data")
    if data.exists():
        data.unlink()
    if big:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save(model, str(path))
