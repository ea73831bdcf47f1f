"""ONNX export and quantization steps.

Quantization goes through ONNX Runtime's own quantizers: int8 = `quantize_dynamic` (per-channel
symmetric weights, MatMulInteger), int4 = `MatMulNBitsQuantizer` (RTN, HQQ or k-quant; MatMulNBits),
fp16 = ONNX Runtime's float16 converter. The component policy is compiled to per-node choices from
the module path every exported node carries (see edgemed.export.onnx.node_components).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from edgemed.errors import BadInputError
from edgemed.steps.base import Step, StepArgs

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.pipeline import Context

log = logging.getLogger(__name__)
GRAPHS = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")


class OnnxExportArgs(StepArgs):
    opset: int = Field(18, ge=17, le=23)


class OnnxExport(Step):
    name = "onnx-export"
    stage = "export"
    formats = ("onnx",)
    summary = "vision encoder + projector, token embeddings and a KV-cache decoder as three ONNX graphs"
    Args = OnnxExportArgs

    def run(self, ctx: "Context") -> None:
        from edgemed.export.onnx import export_onnx

        for name in export_onnx(ctx.cm, ctx.work_dir, opset=self.args.opset, progress=ctx.progress):
            ctx.describe(name, component=_graph_component(name), fmt="onnx", precision="fp32")


class Int4Args(StepArgs):
    algorithm: Literal["rtn", "hqq", "k_quant"] = "rtn"
    block_size: int = 32
    symmetric: bool = False
    # 4 = int8 activations inside MatMulNBits: the fastest CPU kernels (ORT docs).
    accuracy_level: int = Field(4, ge=0, le=4)

    @field_validator("block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError("block_size must be a power of two >= 16")
        return v


class Int8Args(StepArgs):
    per_channel: bool = True
    reduce_range: bool = False


class OnnxQuantizeArgs(StepArgs):
    int4: Int4Args = Field(default_factory=Int4Args)
    int8: Int8Args = Field(default_factory=Int8Args)


class OnnxQuantize(Step):
    name = "onnx-quantize"
    stage = "artifact"
    formats = ("onnx",)
    summary = "ONNX Runtime quantizers per the component policy (int8 dynamic, int4 MatMulNBits, fp16)"
    Args = OnnxQuantizeArgs

    def run(self, ctx: "Context") -> None:
        policy = ctx.recipe.policy
        if policy.embed not in ("fp32", "fp16"):
            raise BadInputError(f"recipe {ctx.recipe.name}: policy.embed", f"'{policy.embed}' is not supported for ONNX",
                                "use fp32 or fp16 for embed")
        for graph in GRAPHS:
            path = ctx.work_dir / graph
            if not path.exists():
                continue
            ctx.progress(f"quantize {graph}")
            precisions = quantize_graph(path, policy, self.args)
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
        del model.graph.node[:]
        model.graph.node.extend(keep)
        used = {i for n in model.graph.node for i in n.input}
        keep_init = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep_init)
    return folded


def quantize_graph(path: Path, policy, args: OnnxQuantizeArgs) -> dict[str, str]:
    """Quantize one graph in place. Returns {component: precision} for the components present."""
    import onnx

    from edgemed.export.onnx import node_components

    model = onnx.load(str(path))
    _fold_weight_transposes(model)
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
    if by_prec.get("int4"):
        model = _int4(model, by_prec["int4"], args.int4)
    if by_prec.get("int8"):
        model = _int8(model, path, by_prec["int8"], args.int8)
    if "fp16" in wanted.values():
        model = _fp16(model, [c for c, p in wanted.items() if p == "fp16"], comps)
    _save(model, path)
    return wanted


def _int4(model, nodes: list[str], a: Int4Args):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig, KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    include = set(nodes)
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in include]
    if a.algorithm == "hqq":
        cfg = HQQWeightOnlyQuantConfig(block_size=a.block_size, bits=4)
    elif a.algorithm == "k_quant":
        cfg = KQuantWeightOnlyQuantConfig()
    else:
        cfg = DefaultWeightOnlyQuantConfig(block_size=a.block_size, is_symmetric=a.symmetric,
                                           accuracy_level=a.accuracy_level)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=a.block_size, is_symmetric=a.symmetric,
                             accuracy_level=a.accuracy_level, nodes_to_exclude=exclude, algo_config=cfg)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    q.process()
    return q.model.model


def _int8(model, path: Path, nodes: list[str], a: Int8Args):
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
