"""The component policy compiled to per-node quantizers for one ONNX graph.

Quantized graphs use ONNX Runtime's operators and, where they do the job, its quantizers: int8 =
MatMulNBits bits 8 (`MatMulNBitsQuantizer`) or `quantize_dynamic`; int4 = MatMulNBits with its
blocks chosen by a registered int4 algorithm (edgemed.formats.onnx.int4); an int8 embedding table
= GatherBlockQuantized; fp16 = ONNX Runtime's float16 converter. The policy reaches each node
through the module path every exported node carries (edgemed.formats.onnx.export.node_components).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from edgemed.errors import BadInputError
from edgemed.formats.onnx import OnnxBackend
from edgemed.formats.onnx.graph import fit_block, fold_weight_transposes, gemm_to_matmul, replace_nodes, save_model
from edgemed.formats.onnx.int4 import INT4_ALGORITHMS, ort_nbits

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.formats.onnx.args import Int8Args, OnnxQuantizeArgs

log = logging.getLogger(__name__)


def quantize_graph(path: Path, policy, args: "OnnxQuantizeArgs", calibration=None,
                   activations: str = "fp32") -> dict[str, str]:
    """Quantize one graph in place. Returns {component: precision} for the components present.
    calibration: a callable giving this graph's calibration statistics (grids.ProbeStats or
    parent_stats.ParentStats), called once where a calibrated quantizer runs.
    activations fp16: int4 in blocks of args.int4.fp16_block_size, then the whole graph in fp16
    (the decoder's inputs_embeds, KV cache and logits too; the other graphs keep fp32 inputs and
    outputs, cast inside); components the policy leaves at fp32 are stored fp16."""
    import onnx

    from edgemed.formats.onnx.graph import DECODER

    model = onnx.load(str(path))
    fold_weight_transposes(model)
    gemm_to_matmul(model)
    comps, wanted, by_prec = node_precisions(model, policy, args, activations, path.name)
    model = quantize_nodes(model, path, by_prec, args, activations, _once(calibration))
    if wanted.get("embed") == "int8":
        gather_int8(model, comps, args.int8.block_size)
    retag_and_check(model, comps, by_prec, path.name)
    if activations == "fp16":
        model = fp16_graph(model, keep_io_types=path.name != DECODER)
        wanted = {c: "fp16" if p == "fp32" else p for c, p in wanted.items()}
    elif "fp16" in wanted.values():
        model = fp16_components(model, [c for c, p in wanted.items() if p == "fp16"], comps)
    order_initializers(model)
    save_model(model, path)
    return wanted


def order_initializers(model) -> None:
    """Initializers in the order the nodes first read them, with no explicit data_location for data
    held in the graph: the quantizers append theirs in orders of their own and onnx.load marks what
    it read from external data, and the streamed path (one node at a time) must write the same file
    as the in-memory one."""
    from onnx import TensorProto

    first: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            first.setdefault(name, i)
    model.graph.initializer.sort(key=lambda t: (first.get(t.name, len(first)), t.name))  # in place: no copy
    for t in model.graph.initializer:
        if t.HasField("data_location") and t.data_location == TensorProto.DEFAULT:
            t.ClearField("data_location")


def _once(calibration):
    cached: list = []

    def stats():  # computed once for whichever calibrated quantizers run on this graph
        if calibration is None:
            return None
        if not cached:
            cached.append(calibration())
        return cached[0]

    return stats


def node_precisions(model, policy, args: "OnnxQuantizeArgs", activations: str, graph: str):
    """(node -> component, component -> precision, precision -> [MatMul nodes]) for one graph: the
    component policy, with the recipe's int8_projections moved from int4 to int8."""
    from edgemed.formats.onnx.graph import node_components

    comps = node_components(model)
    wanted = {c: getattr(policy, c) for c in set(comps.values()) if hasattr(policy, c)}
    inits = {t.name for t in model.graph.initializer}
    by_prec: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits and n.name in comps:
            by_prec.setdefault(wanted.get(comps[n.name], "fp32"), []).append(n.name)
    for prec in by_prec:
        if prec not in OnnxBackend.precisions:
            raise BadInputError(f"{graph}: policy", f"precision '{prec}' cannot be expressed in ONNX",
                                f"use {', '.join(sorted(OnnxBackend.precisions))} for ONNX recipes")
    if by_prec.get("int4") and args.int4.int8_projections and activations == "fp32":
        keep = [n for n in by_prec["int4"] if comps.get(n) == "language"
                and any(p in n for p in args.int4.int8_projections)]
        by_prec["int4"] = [n for n in by_prec["int4"] if n not in set(keep)]
        by_prec.setdefault("int8", []).extend(keep)
    return comps, wanted, by_prec


def quantize_nodes(model, path: Path, by_prec: dict[str, list[str]], args: "OnnxQuantizeArgs", activations: str,
                   stats):
    """The int4 and int8 MatMuls of `by_prec` quantized (stats(): the calibration statistics)."""
    block4 = args.int4.fp16_block_size if activations == "fp16" else args.int4.block_size
    if by_prec.get("int4"):
        algorithm = INT4_ALGORITHMS.get(args.int4.algorithm, "onnx-quantize int4.algorithm")
        model = algorithm.quantize(model, by_prec["int4"], block4, args.int4, stats() if algorithm.calibrated else None)
    if by_prec.get("int8"):
        if args.int8.method == "nbits" and args.int8.algorithm == "mse":
            model = int8_mse(model, by_prec["int8"], args.int8.block_size, args.int8.accuracy_level, stats())
        elif args.int8.method == "nbits":
            model = ort_nbits(model, by_prec["int8"], 8, args.int8.block_size, args.int8.symmetric,
                              args.int8.accuracy_level, "rtn")
        else:
            model = int8_dynamic(model, path, by_prec["int8"], args.int8)
    return model


def quantize_graph_streamed(path: Path, policy, args: "OnnxQuantizeArgs", calibration=None) -> dict[str, str]:
    """quantize_graph for a graph whose weights stay in its external data (compress --low-memory):
    each MatMul is read, quantized by the same code as in memory (as a one-node graph) and written
    out before the next is read (edgemed.formats.onnx.external), so the peak is one weight."""
    import onnx
    from onnx import helper

    from edgemed.formats.onnx.external import TensorSink, read_array, save_streamed

    model = onnx.load(str(path), load_external_data=False)
    comps, wanted, by_prec = node_precisions(model, policy, args, "fp32", path.name)
    if by_prec.get("int8") and args.int8.method != "nbits":
        raise BadInputError(f"{path.name}: int8.method {args.int8.method}", "needs the whole graph in memory",
                            "use int8.method nbits, or compress without --low-memory")
    prec_of = {n: p for p in ("int4", "int8") for n in by_prec.get(p, [])}
    stats, base = _once(calibration), path.parent
    inits = {t.name: t for t in model.graph.initializer}
    scratch = path.with_name(path.name + ".quantized.data")
    sink = TensorSink(scratch, scratch.name)
    nodes, new_inits, opsets = [], [], {o.domain: o.version for o in model.opset_import}
    try:
        for node in model.graph.node:
            if node.name not in prec_of:
                nodes.append(node)
                continue
            w = onnx.numpy_helper.from_array(read_array(inits[node.input[1]], base), node.input[1])
            one = helper.make_model(helper.make_graph(
                [node], "one", [helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None)],
                [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in node.output], [w]),
                opset_imports=list(model.opset_import), ir_version=model.ir_version)
            one = quantize_nodes(one, path, {prec_of[node.name]: [node.name]}, args, "fp32", stats)
            for t in one.graph.initializer:
                sink.put(t, base)
            # Copies: a reference into `one` would keep its whole protobuf arena alive (the fp32
            # weight included), which grew the RSS by every weight read (measured: +0.25 GB / 2 min).
            nodes += [_copy(n, onnx.NodeProto) for n in one.graph.node]
            new_inits += [_copy(t, onnx.TensorProto) for t in one.graph.initializer]
            for o in one.opset_import:
                opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
            del one, w
        sink.close()
        replace_nodes(model, nodes, new_inits)
        del model.opset_import[:]
        model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
        retag_and_check(model, comps, by_prec, path.name)
        order_initializers(model)
        save_streamed(model, path, base)
    finally:
        sink.discard()
    return wanted


def _copy(message, cls):
    out = cls()
    out.CopyFrom(message)
    return out


def retag_and_check(model, comps: dict[str, str], by_prec: dict[str, list[str]], graph: str) -> None:
    """Quantizers replace nodes (MatMul 'x' -> MatMulNBits 'x_Q4'): carry each node's component
    tag over, and check that every MatMul the policy sent to int4/int8 really became one, so a
    quantizer that ignores its node list can never pass silently."""
    from edgemed.formats.onnx.graph import COMPONENT_KEY

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


def int8_mse(model, nodes: list[str], block_size: int, accuracy_level: int, stats):
    """Each MatMul in `nodes` -> MatMulNBits bits 8 on grids.mse_quantize_int8's blocks (importance
    from the calibration statistics where given); a MatMul whose K has no block falls back to rtn."""
    import numpy as np
    from onnx import helper, numpy_helper

    from edgemed.formats.onnx.graph import inputs_of
    from edgemed.formats.onnx.int4 import finish_int4_rewrite, rewrite_matmuls
    from edgemed.formats.onnx.int4.grids import mse_quantize_int8

    importance = stats.mean_squares(model, inputs_of(model, nodes)) if stats else {}

    def rewrite(node, w, b):
        k, n = w.shape
        q, scales = mse_quantize_int8(w, b, importance.get(node.input[0]))
        name = node.name
        node_out = helper.make_node("MatMulNBits", [node.input[0], f"{name}.q8", f"{name}.scales"], list(node.output),
                                    name=f"{name}_Q8", domain="com.microsoft", K=k, N=n, bits=8, block_size=b,
                                    accuracy_level=accuracy_level)
        return node_out, [numpy_helper.from_array(q.T.reshape(n, k // b, b).copy(), f"{name}.q8"),
                          numpy_helper.from_array(scales.T.astype(np.float32).reshape(-1), f"{name}.scales")]

    new_nodes, new_inits, fallback = rewrite_matmuls(model, nodes, block_size, rewrite)
    return finish_int4_rewrite(model, new_nodes, new_inits, fallback, block_size, accuracy_level, "int8 mse",
                               bits=8, symmetric=True)


def gather_int8(model, comps: dict[str, str], block_size: int) -> None:
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


def int8_dynamic(model, path: Path, nodes: list[str], a: "Int8Args"):
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


def fp16_components(model, components: list[str], comps: dict[str, str]):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    block = [n.name for n in model.graph.node if comps.get(n.name) not in components]
    return convert_float_to_float16(model, keep_io_types=True, node_block_list=block,
                                    op_block_list=["MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear",
                                                   "DequantizeLinear", "QuantizeLinear"])


def fp16_graph(model, keep_io_types: bool):
    """Every float tensor fp16, MatMulNBits scales and fmin offsets included (the quantizers wrote
    them fp32 from fp32 weights; rounding a scale to fp16 moves it by at most 2^-11 of itself).
    int8 dynamic quantization stays fp32 inside casts: DynamicQuantizeLinear takes fp32 only."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=keep_io_types,
                                    op_block_list=["MatMulInteger", "DynamicQuantizeLinear",
                                                   "DequantizeLinear", "QuantizeLinear"])
