"""The component policy as TensorRT-ready Q/DQ per graph: int8 / fp8 static quantization on
MatMul/Conv/Gemm with constant weights, int4 weight-only DequantizeLinear blocks (with an AWQ-style
clip search), fp16 by ONNX Runtime's converter (see steps.py for why this form)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgemed.errors import BadInputError, EdgemedError
from edgemed.formats.onnx.graph import fold_weight_transposes, replace_nodes, save_model
from edgemed.formats.onnx.quantize import fp16_components
from edgemed.formats.tensorrt.args import FLOAT_PRECISIONS, QDQ_PRECISIONS, TrtExportArgs

log = logging.getLogger(__name__)


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
    from edgemed.formats.onnx.graph import node_components

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

    from edgemed.formats.onnx.graph import node_components

    model = onnx.load(str(path), load_external_data=False)
    return {c: getattr(policy, c) for c in set(node_components(model).values()) if hasattr(policy, c)}


def qdq_graph(path: Path, policy, args: TrtExportArgs, feeds: list[dict] | None) -> dict[str, str]:
    """Quantize one graph in place into explicit Q/DQ form. Returns {component: precision}."""
    import onnx

    from edgemed.formats.onnx.graph import node_components

    model = onnx.load(str(path))
    fold_weight_transposes(model)
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
        model = fp16_components(model, fp16, comps)
    _tag_and_check(model, comps, nodes, path.name)
    save_model(model, path)
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

    from edgemed.formats.onnx.graph import probe_session

    by_name = {n.name: n for n in model.graph.node}
    wanted = {name: by_name[name].input[0] for name in nodes}
    sess = probe_session(model, sorted(set(wanted.values())))
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

    from edgemed.formats.onnx.graph import COMPONENT_KEY

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
